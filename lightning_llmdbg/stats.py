"""Tensor statistics as pure functions: no Lightning, no loggers, easy to check against a hand computation.

Everything stays on the tensors' device; callers move one stacked result to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _scatter(values: Tensor, size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """A float32 vector of ``size`` zeros with ``values`` at positions ``present``."""
    out = torch.zeros(size, dtype=torch.float32, device=device)
    out[torch.as_tensor(present, device=device)] = values.float()
    return out


def per_tensor_sumsq(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Sum of squares of each tensor, in float32, scattered to positions ``present`` of a zero vector of ``size``.

    One fused ``torch._foreach_norm`` pass over all tensors; missing tensors (no gradient) count as zero, so
    the vector has the same length on every rank.
    """
    if not tensors:
        return torch.zeros(size, dtype=torch.float32, device=device)
    norms = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
    return _scatter(norms * norms, size, present, device)


def per_tensor_absmax(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Largest absolute value of each tensor (NaN if the tensor holds a NaN), scattered like :func:`per_tensor_sumsq`."""
    if not tensors:
        return torch.zeros(size, dtype=torch.float32, device=device)
    if device.type == "cpu":
        # On CPU the fused inf-norm takes a slow path (about 8x this): one min-max pass per tensor, no copies.
        maxima = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors]).abs().amax(1)
    else:
        maxima = torch.stack(torch._foreach_norm(list(tensors), float("inf")))
    return _scatter(maxima, size, present, device)


def per_tensor_nonfinite(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Count of NaN/Inf values in each tensor. One kernel per tensor: callers run it only when a norm is non-finite."""
    if not tensors:
        return torch.zeros(size, dtype=torch.float32, device=device)
    return _scatter(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]), size, present, device)


def group_sum(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Sum per group of a per-tensor vector."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_index, values)


def group_max(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Max per group of a non-negative per-tensor vector (NaN propagates)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, group_index, values, reduce="amax", include_self=True)


@dataclass
class Histogram:
    """A histogram of the finite values of some tensors, plus a count of the non-finite ones left out."""

    counts: list[float]
    edges: list[float]
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    nonfinite: int


def finite_range(tensors: Sequence[Tensor]) -> Tensor:
    """``[min, -max]`` over the finite values of ``tensors`` (max negated so that one MIN reduction serves both).

    ``[inf, inf]`` when there is no finite value.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.full((2,), float("inf"), device=device)
    for t in tensors:
        t = t.detach().float().flatten()
        finite = torch.isfinite(t)
        both = torch.stack([torch.where(finite, t, float("inf")), torch.where(finite, -t, float("inf"))])
        out = torch.minimum(out, both.amin(dim=1))
    return out


def histogram_counts(tensors: Sequence[Tensor], lo: float, hi: float, bins: int) -> Tensor:
    """``[counts (bins), num, sum, sum of squares]`` of the finite values of ``tensors`` over ``[lo, hi]``."""
    device = tensors[0].device if tensors else torch.device("cpu")
    counts = torch.zeros(bins, dtype=torch.float32, device=device)
    moments = torch.zeros(3, dtype=torch.float32, device=device)
    lo, hi = _nonempty_span(lo, hi)
    for t in tensors:
        values = t.detach().float().flatten()
        values = values[torch.isfinite(values)]
        counts += torch.histc(values, bins=bins, min=lo, max=hi)
        moments += torch.stack([torch.tensor(float(values.numel()), device=device), values.sum(), (values * values).sum()])
    return torch.cat([counts, moments])


def histogram_edges(lo: float, hi: float, bins: int) -> list[float]:
    lo, hi = _nonempty_span(lo, hi)
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()


def _nonempty_span(lo: float, hi: float) -> tuple[float, float]:
    """Widen a zero-width range (all values equal) so that bins have a width."""
    if hi > lo:
        return lo, hi
    return lo, lo + max(abs(lo) * 1e-6, 1e-12)


# -- activations ---------------------------------------------------------------------------------------------------
# Thresholds of LLM.int8 (Dettmers et al., 2022): a hidden dimension is an outlier feature when |x| >= 6 at
# >= 6% of positions (the paper also asks for >= 25% of layers, which is a question across layers, left to readers).
OUTLIER_MAGNITUDE = 6.0
OUTLIER_FRACTION = 0.06

# Sums that add up across micro-batches and ranks: [rows, elements, Σx, Σx², Σx³, Σx⁴, zeros], then per channel
# Σx² (C) and the count of |x| >= 6 (C). Maxima: [max |x|], then per channel max x (C).
ACT_SCALARS = 7


def activation_partials(x: Tensor) -> tuple[Tensor, Tensor]:
    """Partial sums (float64) and maxima (float32) of one activation ``[..., C]``; see :func:`activation_stats`.

    The moments leave as raw float64 sums, so that they add up across micro-batches and ranks. They are taken in
    float32 about the tensor's own mean and shifted to raw sums in float64 afterwards: summing powers of centred
    values keeps the precision that raw float32 powers would lose when the mean is large against the spread
    (a channel at 100 ± 1), without a float64 copy of the activation. Each reduction is a float32 cascade sum
    (``sum(dtype=float64)`` would copy the tensor to float64 first); temporaries live for this call only.
    """
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    rows = flat.shape[0]
    shift = flat.mean()
    d = flat - shift
    d2 = d * d
    channel_d1, channel_d2 = d.sum(0), d2.sum(0)
    # Two temporaries for the whole call: the later passes write into the buffers of the earlier ones. (A float32
    # BLAS dot would skip a pass but lose the cascade sum's precision: kurtosis off by 4e-5 on 6M values.)
    d3 = d.mul_(d2).sum()
    d4 = d2.square_().sum()
    absolute = torch.abs(flat, out=d)
    absmax = absolute.amax().float().reshape(1)
    outliers = absolute.ge_(OUTLIER_MAGNITUDE).sum(0).double()
    nonzeros = torch.ne(flat, 0, out=d2).sum().double()
    channel_max = flat.amax(0).float()

    m, n = shift.double(), float(flat.numel())
    d1, d2_sum, d3, d4 = channel_d1.sum().double(), channel_d2.sum().double(), d3.double(), d4.double()
    raw = torch.stack(
        [
            d1 + n * m,
            d2_sum + 2 * m * d1 + n * m**2,
            d3 + 3 * m * d2_sum + 3 * m**2 * d1 + n * m**3,
            d4 + 4 * m * d3 + 6 * m**2 * d2_sum + 4 * m**3 * d1 + n * m**4,
        ]
    )
    channel_sq = channel_d2.double() + 2 * m * channel_d1.double() + rows * m**2
    counts = torch.stack([torch.full_like(m, rows), torch.full_like(m, n)])  # filled on the device: no host copy
    sums = torch.cat([counts, raw, (n - nonzeros).reshape(1), channel_sq, outliers])
    return sums, torch.cat([absmax, channel_max])


def activation_stats(sums: Tensor, maxes: Tensor) -> dict[str, float]:
    """Statistics from (reduced) partials, on the host.

    - ``mean``, ``std`` (population), ``rms``, ``absmax`` over all values;
    - ``zero_frac``: fraction of exact zeros;
    - ``dead_frac``: fraction of channels (last dimension) whose value never exceeds zero;
    - ``outliers``: channels with |x| >= 6 at >= 6% of positions (LLM.int8);
    - ``channel_kurtosis``: E[r⁴] / E[r²]² over the per-channel RMS r (1 when all channels have the same scale);
    - ``kurtosis``: E[(x-μ)⁴] / σ⁴ of the values (3 for a Gaussian).
    """
    # NumPy on the host: a dozen small reductions cost microseconds there, where each torch call costs ten.
    sums = sums.detach().double().cpu().numpy()
    maxes = maxes.detach().double().cpu().numpy()
    channels = (sums.size - ACT_SCALARS) // 2
    rows, n, s1, s2, s3, s4, zeros = sums[:ACT_SCALARS].tolist()
    channel_sq = sums[ACT_SCALARS : ACT_SCALARS + channels]
    outlier_counts = sums[ACT_SCALARS + channels :]
    mean, ex2, ex3, ex4 = s1 / n, s2 / n, s3 / n, s4 / n
    var = max(ex2 - mean * mean, 0.0)
    m4 = ex4 - 4 * mean * ex3 + 6 * mean * mean * ex2 - 3 * mean**4
    channel_ms = channel_sq / rows  # per-channel mean square = r²
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero channels: NaN, as 0/0 is
        channel_kurtosis = float((channel_ms * channel_ms).mean() / channel_ms.mean() ** 2)
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "rms": math.sqrt(ex2),
        "absmax": float(maxes[0]),
        "zero_frac": zeros / n,
        "dead_frac": float((maxes[1:] <= 0).mean()),
        "outliers": float((outlier_counts / rows >= OUTLIER_FRACTION).sum()),
        "channel_kurtosis": channel_kurtosis,
        "kurtosis": m4 / (var * var) if var > 0 else float("nan"),
    }


# Rows of attention probabilities per chunk of the entropy pass: 2^18 float32 values (1 MiB) and its log stay in a
# core's L2 cache, where the whole [B, H, T, T] tensor would go through memory for each of the four passes.
_ENTROPY_CHUNK_VALUES = 1 << 18


def attention_partials(probs: Tensor) -> Tensor:
    """Per head ``[Σ rows' entropy −Σ p log p, number of rows]`` of attention probabilities ``[B, H, Tq, Tk]``."""
    probs = probs.detach()
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    # p · log(max(p, 1e-30)) is exactly 0 where p = 0 (the masked half of causal attention). Clamping first keeps
    # log off its slow -inf and denormal paths on CPU (torch.special.entr and xlogy are 2.5x slower in a training
    # step). On CPU the passes run chunk by chunk through one scratch buffer: 1.5x faster than over the whole tensor.
    rows = probs.reshape(-1, probs.shape[-1])
    chunk = max(1, _ENTROPY_CHUNK_VALUES // max(rows.shape[1], 1)) if rows.is_cpu else rows.shape[0]
    scratch = torch.empty((min(chunk, rows.shape[0]), rows.shape[1]), dtype=rows.dtype, device=rows.device)
    parts = []
    for start in range(0, rows.shape[0], chunk):
        p = rows[start : start + chunk]
        plogp = torch.clamp_min(p, 1e-30, out=scratch[: p.shape[0]]).log_().mul_(p)
        parts.append(plogp.sum(-1))
    entropy = torch.cat(parts).neg_().view(probs.shape[:-1])  # [B, H, Tq]
    per_head = entropy.sum(dim=(0, 2), dtype=torch.float64)
    return torch.cat([per_head, torch.full_like(per_head, entropy.shape[0] * entropy.shape[2])])


def attention_stats(partials: Tensor) -> dict[str, float]:
    per_head = partials.detach().double().cpu().numpy().reshape(2, -1)
    per_head = per_head[0] / per_head[1]
    return {"entropy_mean": float(per_head.mean()), "entropy_min": float(per_head.min())}


def logit_partials(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``[Σ logsumexp², positions]`` and ``[max logit]`` of output logits ``[..., V]``."""
    logits = logits.detach().float()
    lse = torch.logsumexp(logits, dim=-1)
    sums = torch.stack([(lse * lse).sum(dtype=torch.float64), torch.tensor(float(lse.numel()), dtype=torch.float64, device=lse.device)])
    return sums, logits.amax().reshape(1)


# Fixed, data-independent histogram edges, so that histograms from micro-batches and ranks add up:
# ±10^-6 .. ±10^6 with 8 bins per decade, one bin around zero; values beyond fall into the outermost bins.
_DECADES = torch.arange(-6 * 8, 6 * 8 + 1, dtype=torch.float64) / 8
FIXED_EDGES = torch.cat([-torch.flip(10.0**_DECADES, [0]), 10.0**_DECADES])


def fixed_histogram_partials(x: Tensor) -> Tensor:
    """``[counts per FIXED_EDGES bin (len-1), non-finite count]`` of ``x``."""
    values = x.detach().flatten().float()
    edges = FIXED_EDGES.to(device=values.device, dtype=torch.float32)
    bins = len(edges) - 1
    # Non-finite values go to one more bin at the end (no boolean mask: its shape would depend on the data).
    index = torch.bucketize(values, edges[1:-1].contiguous(), right=True, out_int32=True)
    index = torch.where(torch.isfinite(values), index, bins)
    if torch.compiler.is_compiling():  # bincount's output shape depends on the data too: it would break the graph
        ones = torch.ones((), dtype=torch.float64, device=values.device).expand(values.numel())
        return torch.zeros(bins + 1, dtype=torch.float64, device=values.device).scatter_add_(0, index.long(), ones)
    return torch.bincount(index, minlength=bins + 1).double()


def fixed_histogram(partials: Tensor) -> Histogram:
    """A :class:`Histogram` from reduced :func:`fixed_histogram_partials`, trimmed to its non-empty range."""
    partials = partials.cpu()
    counts, nonfinite = partials[:-1], int(partials[-1])
    nonzero = torch.nonzero(counts).flatten()
    if nonzero.numel() == 0:
        return Histogram([], [], 0.0, 0.0, 0.0, 0.0, 0.0, nonfinite)
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    edges = FIXED_EDGES[lo : hi + 1]
    kept = counts[lo:hi]
    centers = (edges[:-1] + edges[1:]) / 2
    return Histogram(
        counts=kept.tolist(),
        edges=edges.tolist(),
        min=float(edges[0]),
        max=float(edges[-1]),
        num=float(kept.sum()),
        sum=float((kept * centers).sum()),
        sum_squares=float((kept * centers * centers).sum()),
        nonfinite=nonfinite,
    )
