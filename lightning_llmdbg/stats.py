"""Tensor statistics as pure functions: no Lightning, no loggers, easy to check against a hand computation.

Everything stays on the tensors' device; callers move one stacked result to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

# Partial sums of one activation about a shift m, its own mean: [rows, elements, m, Σd³, Σd⁴, non-zeros], then per
# channel Σd (C), Σd² (C) and the count of |x| >= 6 (C), with d = x − m. Partials about one shift add up; partials
# from micro-batches and ranks are moved to shift 0 first (`add_activation_partials`). Maxima: [max |x|], then per
# channel max x (C).
ACT_SCALARS = 6


def activation_partials(x: Tensor) -> tuple[Tensor, Tensor]:
    """Partial sums (float64) and maxima (float32) of one activation ``[..., C]``; see :func:`activation_stats`.

    The powers are summed about the tensor's own mean: summing powers of centred values keeps the precision that
    raw float32 powers would lose when the mean is large against the spread (a channel at 100 ± 1), without a
    float64 copy of the activation. The sums stay about that mean; the host moves them to the moments it reports
    (:func:`activation_stats`), so a hook runs no scalar float64 arithmetic (that was a quarter of its time).
    The even powers are float32 cascade sums (``sum(dtype=float64)`` would copy the tensor to float64 first).
    Temporaries live for this call only.
    """
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    shift = flat.mean()
    d = flat - shift
    d2 = d * d
    channel_d1, channel_d2 = d.sum(0), d2.sum(0)
    # Σd³ as a BLAS dot: one read pass where a product and its sum are three. Its float32 rounding does not reach
    # the kurtosis: about the mean, Σd³ enters the fourth central moment multiplied by Σd / n, which is ~0.
    # Σd⁴ stays a cascade sum (a dot puts the kurtosis 4e-5 off on 6M values).
    d3 = torch.dot(d.view(-1), d2.view(-1))
    d4 = torch.mul(d2, d2, out=d).sum()
    channel_max, channel_min = flat.amax(0), flat.amin(0)
    absmax = torch.maximum(channel_max.max(), channel_min.min().neg()).reshape(1)
    if flat.is_cpu and not torch.compiler.is_compiling() and absmax.item() < OUTLIER_MAGNITUDE:
        # On the CPU a scalar read costs nothing (on a GPU it would wait for the device), and many layers have no
        # value at the outlier magnitude: their count is zero without its three passes.
        outliers = torch.zeros(flat.shape[1], dtype=torch.float64)
    else:
        outliers = torch.abs(flat, out=d2).ge_(OUTLIER_MAGNITUDE).sum(0).double()
    nonzeros = torch.ne(flat, 0, out=d).sum()
    # The counts are float64 from the start (float32 is exact to 2^24 only), filled on the device: no host copy.
    counts = torch.full((2,), float(flat.numel()), dtype=torch.float64, device=flat.device)
    counts[0] = flat.shape[0]
    moments = torch.cat([torch.stack([shift, d3, d4, nonzeros]), channel_d1, channel_d2]).double()
    return torch.cat([counts, moments, outliers]), torch.cat([absmax, channel_max]).float()


def activation_partials_about_zero(sums: Tensor) -> Tensor:
    """The same partial sums moved to shift 0 (raw power sums, in float64), which add up whatever their shifts."""
    rows, n, m, d3, d4 = sums[0], sums[1], sums[2], sums[3], sums[4]
    channels = (sums.numel() - ACT_SCALARS) // 3
    channel_d1 = sums[ACT_SCALARS : ACT_SCALARS + channels]
    channel_d2 = sums[ACT_SCALARS + channels : ACT_SCALARS + 2 * channels]
    d1, d2 = channel_d1.sum(), channel_d2.sum()
    raw3 = d3 + 3 * m * d2 + 3 * m**2 * d1 + n * m**3
    raw4 = d4 + 4 * m * d3 + 6 * m**2 * d2 + 4 * m**3 * d1 + n * m**4
    head = torch.stack([rows, n, torch.zeros_like(m), raw3, raw4, sums[5]])
    channel_raw1 = channel_d1 + rows * m
    channel_raw2 = channel_d2 + 2 * m * channel_d1 + rows * m**2
    return torch.cat([head, channel_raw1, channel_raw2, sums[ACT_SCALARS + 2 * channels :]])


def add_activation_partials(a: Tensor, b: Tensor) -> Tensor:
    """Partial sums of two parts of one activation (micro-batches, ranks, or two calls of one module), added."""
    return activation_partials_about_zero(a) + activation_partials_about_zero(b)


def activation_stats(sums: Tensor, maxes: Tensor) -> dict[str, float]:
    """Statistics from (added up) partials, on the host.

    - ``mean``, ``std`` (population), ``rms``, ``absmax`` over all values;
    - ``zero_frac``: fraction of exact zeros;
    - ``dead_frac``: fraction of channels (last dimension) whose value never exceeds zero;
    - ``outliers``: channels with |x| >= 6 at >= 6% of positions (LLM.int8);
    - ``channel_kurtosis``: E[r⁴] / E[r²]² over the per-channel RMS r (1 when all channels have the same scale);
    - ``kurtosis``: E[(x-μ)⁴] / σ⁴ of the values (3 for a Gaussian).
    """
    # NumPy on the host, a few whole-vector calls: each torch call costs ten microseconds, each NumPy call one.
    sums = sums.detach().cpu().numpy().astype(np.float64, copy=False)
    maxes = maxes.detach().cpu().numpy().astype(np.float64, copy=False)
    channels = (sums.size - ACT_SCALARS) // 3
    rows, n, m, s3, s4, nonzeros = sums[:ACT_SCALARS].tolist()
    channel_s1 = sums[ACT_SCALARS : ACT_SCALARS + channels]
    channel_s2 = sums[ACT_SCALARS + channels : ACT_SCALARS + 2 * channels]
    outlier_counts = sums[ACT_SCALARS + 2 * channels :]
    # Central moments from the sums about m: with δ = E[x − m], E[(x − μ)^k] follows from E[(x − m)^j], j <= k.
    delta, e2, e3, e4 = float(channel_s1.sum()) / n, float(channel_s2.sum()) / n, s3 / n, s4 / n
    mean = m + delta
    var = max(e2 - delta * delta, 0.0)
    m4 = e4 - 4 * delta * e3 + 6 * delta * delta * e2 - 3 * delta**4
    channel_ms = (channel_s2 + 2 * m * channel_s1) / rows + m * m  # per-channel mean square = r²
    ms_sum, ms_sq_sum = float(channel_ms.sum()), float(np.dot(channel_ms, channel_ms))
    # All-zero channels: NaN, as 0/0 is.
    channel_kurtosis = ms_sq_sum * channels / (ms_sum * ms_sum) if ms_sum else float("nan")
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "rms": math.sqrt(max(var + mean * mean, 0.0)),
        "absmax": float(maxes[0]),
        "zero_frac": (n - nonzeros) / n,
        "dead_frac": int(np.count_nonzero(maxes[1:] <= 0)) / channels,
        "outliers": float(np.count_nonzero(outlier_counts >= OUTLIER_FRACTION * rows)),
        "channel_kurtosis": channel_kurtosis,
        "kurtosis": m4 / (var * var) if var > 0 else float("nan"),
    }


def fused_activation_partials(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`activation_partials` written for ``torch.compile`` (:class:`FusedStatistics`): the same partials in the
    same layout, with no BLAS call and no data-dependent branch between the passes, so that they fuse into two loops
    over the activation (its mean, then everything else) that write only the sums. The sums accumulate in float64
    inside the loop, which costs nothing where the loop waits on memory and is more precise than float32 sums."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    rows, channels = flat.shape
    shift = (flat.sum(dtype=torch.float64) / flat.numel()).to(flat.dtype)
    d = flat - shift
    d2 = d * d
    channel_d1, channel_d2 = d.sum(0, dtype=torch.float64), d2.sum(0, dtype=torch.float64)
    d3, d4 = (d2 * d).sum(dtype=torch.float64), (d2 * d2).sum(dtype=torch.float64)
    channel_max, channel_min = flat.amax(0), flat.amin(0)
    absmax = torch.maximum(channel_max.amax(), channel_min.amin().neg()).reshape(1)
    outliers = (flat.abs() >= OUTLIER_MAGNITUDE).sum(0, dtype=torch.float64)
    nonzeros = (flat != 0).sum(dtype=torch.float64)
    counts = torch.full((2,), float(rows * channels), dtype=torch.float64, device=flat.device)
    counts[0] = rows
    head = torch.cat([counts, torch.stack([shift.double(), d3, d4, nonzeros])])
    return torch.cat([head, channel_d1, channel_d2, outliers]), torch.cat([absmax, channel_max]).float()


# Rows of attention probabilities per chunk of the entropy pass: 2^18 float32 values (1 MiB) and its log stay in a
# core's L2 cache, where the whole [B, H, T, T] tensor would go through memory for each of the four passes.
_ENTROPY_CHUNK_VALUES = 1 << 18


def _row_entropy(rows: Tensor, scratch: Tensor) -> Tensor:
    """−Σ p log p of each row of probabilities ``[n, k]``, through ``scratch`` (at least ``n·k`` values)."""
    # p · log(max(p, 1e-30)) is exactly 0 where p = 0 (the masked half of causal attention). Clamping first keeps
    # log off its slow -inf and denormal paths on CPU (torch.special.entr and xlogy are 2.5x slower in a training
    # step).
    plogp = torch.clamp_min(rows, 1e-30, out=scratch.view(-1)[: rows.numel()].view(rows.shape)).log_().mul_(rows)
    return plogp.sum(-1).neg_()


def attention_partials(probs: Tensor) -> Tensor:
    """Per head ``[Σ rows' entropy −Σ p log p, number of rows]`` of attention probabilities ``[B, H, Tq, Tk]``."""
    probs = probs.detach()
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    # On CPU the passes run chunk by chunk through one scratch buffer: 1.5x faster than over the whole tensor.
    rows = probs.reshape(-1, probs.shape[-1])
    chunk = max(1, _ENTROPY_CHUNK_VALUES // max(rows.shape[1], 1)) if rows.is_cpu else rows.shape[0]
    scratch = torch.empty((min(chunk, rows.shape[0]), rows.shape[1]), dtype=rows.dtype, device=rows.device)
    parts = [_row_entropy(rows[start : start + chunk], scratch) for start in range(0, rows.shape[0], chunk)]
    entropy = torch.cat(parts).view(probs.shape[:-1])  # [B, H, Tq]
    per_head = entropy.sum(dim=(0, 2), dtype=torch.float64)
    return torch.cat([per_head, torch.full_like(per_head, entropy.shape[0] * entropy.shape[2])])


def fused_attention_partials(probs: Tensor) -> Tensor:
    """:func:`attention_partials` written for ``torch.compile`` (:class:`FusedStatistics`): one loop that reads the
    probabilities once and writes one entropy per row."""
    probs = probs.detach()
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    entropy = (probs * torch.clamp_min(probs, 1e-30).log()).sum(-1).neg()  # [B, H, Tq]; as _row_entropy
    per_head = entropy.sum(dim=(0, 2), dtype=torch.float64)
    return torch.cat([per_head, torch.full_like(per_head, entropy.shape[0] * entropy.shape[2])])


# Attention weights formed again from queries and keys, this many values at a time: in a core's L2 cache on CPU; on
# an accelerator 64 MiB of float32 per chunk-sized temporary (about five live at once), so that a long context never
# has its whole [B, H, L, S] in memory.
_RECOMPUTE_CHUNK_VALUES = {"cpu": 1 << 18}
_RECOMPUTE_CHUNK_DEFAULT = 1 << 24
_CAUSAL_BANDS = 4


def _as_heads(t: Tensor) -> Tensor:
    """``[..., H, L, E]`` (or ``[N, L, E]``: one head) as ``[batch, H, L, E]``."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.reshape(-1, *t.shape[-3:])


def _mask_as_heads(mask: Tensor, query: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """An ``attn_mask`` broadcast as ``scaled_dot_product_attention`` broadcasts it, as ``[batch, H, L, S]``: a
    view where the query is 4-D (no copy of a mask shared by heads or batch)."""
    if query.dim() <= 3 and mask.dim() >= 3:  # [N, L, S] against [N, L, E]: one head
        mask = mask.unsqueeze(-3)
    if query.dim() <= 4:
        return torch.broadcast_to(mask, shape)
    return torch.broadcast_to(mask, (*query.shape[:-3], *shape[1:])).reshape(shape)


def softmax_entropy(logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's largest logit and the entropy of its softmax, for logits ``[..., k]`` (−inf where masked), with
    ``scratch`` (at least the logits' size) for the temporaries."""
    rows = logits.shape[:-1]
    return logits.amax(-1), _row_entropy(logits.softmax(-1).flatten(0, -2), scratch).view(rows)


def fused_softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`softmax_entropy` written for ``torch.compile`` (:class:`FusedStatistics`), without the log of every
    weight: with d = s − max s and e = exp d, −Σ p log p = log Σe − Σ e·d / Σe, two terms ≥ 0 (nothing cancels).
    Two loops read the logits and write one value per row."""
    row_max = logits.amax(-1, keepdim=True)
    d = logits - row_max
    e = torch.exp(d)
    total = e.sum(-1)
    weighted = torch.where(e > 0, e * d, 0.0).sum(-1)  # a masked key: e = 0 and d = −inf, whose product is NaN
    return row_max.squeeze(-1), torch.log(total) - weighted / total


def scaled_dot_product_attention_partials(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    rows_entropy: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention-entropy partials of :func:`attention_partials` and ``[max logit]`` of the weights that
    ``scaled_dot_product_attention(query, key, value, attn_mask, is_causal=, scale=, enable_gqa=)`` forms.

    The fused kernels never return their weights, so they are formed again here, in float32 (autocast off) and
    without gradient, a chunk of query rows at a time: no ``[B, H, L, S]`` tensor exists whole. The masks follow
    ``scaled_dot_product_attention``: a boolean ``attn_mask`` says which keys take part, a float one is added to the
    logits (and to the max logit), ``is_causal`` keeps keys up to the query's own position (top-left aligned).
    A row whose every key is masked out by a boolean or −inf mask has no weights (the kernels return zeros or NaN
    for it) and is left out of its head's count; a finite mask such as Hugging Face's ``finfo.min`` leaves such a
    row uniform, as the kernels compute it, and it counts. The weights are those before attention dropout.
    ``rows_entropy(logits, scratch)`` gives each row's largest logit and softmax entropy (:func:`softmax_entropy`).
    """
    rows_entropy = softmax_entropy if rows_entropy is None else rows_entropy
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        q, k = _as_heads(query.detach()), _as_heads(key.detach())
        if enable_gqa and k.shape[1] != q.shape[1] and q.shape[1] % k.shape[1] == 0:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        batch = torch.broadcast_shapes(q.shape[:1], k.shape[:1])[0]
        heads = torch.broadcast_shapes(q.shape[1:2], k.shape[1:2])[0]  # one key head against many: broadcast
        length, keys = q.shape[2], k.shape[2]
        # [batch·heads, L, E] float32 (copies only of other dtypes): the size of the activations, not of the weights.
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        q = q.expand(batch, heads, *q.shape[2:]).reshape(batch * heads, length, -1).float()
        k = k.expand(batch, heads, *k.shape[2:]).reshape(batch * heads, keys, -1).float().transpose(1, 2)
        mask = None if attn_mask is None else _mask_as_heads(attn_mask.detach(), query, (batch, heads, length, keys))
        device = q.device
        matrices = batch * heads
        if matrices == 0 or length == 0 or keys == 0:
            nothing = torch.zeros(2 * heads, dtype=torch.float64, device=device)
            return nothing, torch.full((1,), float("-inf"), device=device)
        # Each row's entropy and largest logit, [batch·heads, L] (the size of one query channel): the per-head sums
        # are taken once at the end, not chunk by chunk.
        entropy = torch.empty((matrices, length), dtype=torch.float32, device=device)
        row_max = torch.empty((matrices, length), dtype=torch.float32, device=device)
        budget = _RECOMPUTE_CHUNK_VALUES.get(device.type, _RECOMPUTE_CHUNK_DEFAULT)
        rows_per_chunk = min(length, max(1, budget // keys))
        if is_causal:
            # Row bands (at least _CAUSAL_BANDS): a band's rows see keys up to its last row only, and the keys after
            # it are never formed (with 4 bands and L = S, 62.5% of the weights are formed).
            rows_per_chunk = min(rows_per_chunk, -(-length // _CAUSAL_BANDS))
        # A chunk holds at most `budget` values (a single row wider than that: the row).
        scratch_values = min(matrices * rows_per_chunk * keys, max(budget, keys))
        scratch = torch.empty(scratch_values, dtype=torch.float32, device=device)
        matrix = torch.arange(matrices, device=device)
        batch_of, head_of = matrix // heads, matrix % heads
        for r0 in range(0, length, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, length)
            width = min(r1, keys) if is_causal else keys
            matrices_per_chunk = max(1, budget // ((r1 - r0) * width))
            # Masks become a bias that the matrix product adds (a masked_fill broadcast over the matrices: 3x slower).
            causal = None
            if is_causal:
                causal = torch.full((r1 - r0, width), float("-inf"), dtype=torch.float32, device=device).triu_(r0 + 1)
            for m0 in range(0, matrices, matrices_per_chunk):
                m1 = min(m0 + matrices_per_chunk, matrices)
                bias = causal
                if mask is not None:
                    part = mask[batch_of[m0:m1], head_of[m0:m1], r0:r1, :width]
                    part = torch.where(part, 0.0, float("-inf")).float() if part.dtype == torch.bool else part.float()
                    bias = part if bias is None else part + bias
                if bias is None:
                    logits = torch.bmm(q[m0:m1, r0:r1], k[m0:m1, :, :width]).mul_(scale)
                else:  # the scale in the product, where a scaled copy of the queries would be one more pass
                    logits = torch.baddbmm(bias, q[m0:m1, r0:r1], k[m0:m1, :, :width], alpha=scale)
                row_max[m0:m1, r0:r1], entropy[m0:m1, r0:r1] = rows_entropy(logits, scratch)
        some_key = row_max != float("-inf")  # NaN logits stay in, so that they show
        entropy = torch.where(some_key, entropy, 0.0).view(batch, heads, length)
        rows = some_key.view(batch, heads, length).sum(dim=(0, 2), dtype=torch.float64)
        per_head = torch.stack([entropy.sum(dim=(0, 2), dtype=torch.float64), rows])
        return per_head.flatten(), row_max.amax().reshape(1)


def attention_stats(partials: Tensor) -> dict[str, float]:
    per_head = partials.detach().double().cpu().numpy().reshape(2, -1)
    per_head = per_head[0] / per_head[1]
    return {"entropy_mean": float(per_head.mean()), "entropy_min": float(per_head.min())}


def logit_partials(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``[Σ logsumexp², positions]`` and ``[max logit]`` of output logits ``[..., V]``."""
    logits = logits.detach().float()
    # logsumexp written out, so that its row maxima also give the largest logit (one pass fewer).
    row_max = logits.amax(dim=-1, keepdim=True)
    offset = row_max.nan_to_num(0.0, posinf=0.0, neginf=0.0)  # as logsumexp: ±inf rows give ±inf, not NaN
    lse = torch.sub(logits, offset).exp_().sum(-1).log_().add_(offset.squeeze(-1))
    positions = torch.full((), float(lse.numel()), dtype=torch.float64, device=lse.device)
    return torch.stack([(lse * lse).sum(dtype=torch.float64), positions]), row_max.amax().reshape(1)


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


# -- fused ---------------------------------------------------------------------------------------------------------
_COMPILED: dict[Callable, Callable] = {}  # one compiled wrapper per function, shared by every probe in the process
# The first error compiling raised in this process: no later call, of any probe, tries again.
_COMPILE_FAILURE: list[str] = []


class FusedStatistics:
    """The partial sums a probe's hooks take, each compiled by ``torch.compile`` into a loop or two over its tensor
    (``fused_*`` above), or eager.

    Eager, each statistic is several passes through memory, which is what a probed step pays for on a CPU (ten
    passes for an activation). The first call of each function compiles it (seconds, once per process; a later
    shape compiles it once more with dynamic sizes, and after dynamo's recompile limit it runs eager). Where
    compiling fails (the CPU backend needs a C++ compiler), the error is kept (``failure``, once per process) and
    every later call runs eager: a statistic never stops training. Inside a graph being compiled (a
    ``torch.compile``d model), and for tensor subclasses such as ``DTensor``, the eager functions run (and are
    traced into that graph).

    Args:
        compiled: compile; ``False``: always eager.
    """

    # Sizes that change from call to call (the causal bands of one attention call) compile once, with dynamic sizes.
    _DYNAMIC = {"fused_softmax_entropy": True}

    def __init__(self, compiled: bool = True) -> None:
        self.compiled = compiled

    @property
    def failure(self) -> str | None:
        """The error that stopped compiling in this process, as ``"Type: first line"``; None if there was none."""
        return _COMPILE_FAILURE[0] if _COMPILE_FAILURE else None

    def activation(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(fused_activation_partials, activation_partials, x)

    def attention(self, probs: Tensor) -> Tensor:
        return self._call(fused_attention_partials, attention_partials, probs)

    def logits(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(logit_partials, logit_partials, logits)

    def scaled_dot_product_attention(self, *call: Any) -> tuple[Tensor, Tensor]:
        """:func:`scaled_dot_product_attention_partials` of a call's arguments, each chunk's softmax entropy fused."""
        return scaled_dot_product_attention_partials(*call, rows_entropy=self._softmax_entropy)

    def _softmax_entropy(self, logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(fused_softmax_entropy, softmax_entropy, logits, scratch)

    def _call(self, fused: Callable, eager: Callable, x: Tensor, *eager_args: Any) -> Any:
        """``fused(x)`` compiled, else ``eager(x, *eager_args)``."""
        # `is_compiling` first: inside a traced hook, dynamo then never reads (nor guards on) the rest.
        if torch.compiler.is_compiling() or not self.compiled or _COMPILE_FAILURE or type(x) is not Tensor:
            return eager(x, *eager_args)
        try:
            compiled = _COMPILED.get(fused)
            if compiled is None:  # (`torch.compile` itself raises where dynamo is unsupported: a Python too new)
                compiled = _COMPILED[fused] = torch.compile(fused, dynamic=self._DYNAMIC.get(fused.__name__))
            with torch.no_grad():
                return compiled(x)
        except torch.cuda.OutOfMemoryError:
            raise  # not a failure to compile: the eager statistic would run out of memory as well
        except Exception as err:  # a statistic never stops training
            cause = getattr(err, "inner_exception", None) or err  # dynamo wraps the backend's error
            message = str(cause).strip()
            _COMPILE_FAILURE.append(f"{type(cause).__name__}: {message.splitlines()[0] if message else ''}")
            return eager(x, *eager_args)
