"""Tensor statistics as pure functions: no Lightning, no loggers, easy to check against a hand computation.

Everything stays on the tensors' device; callers move one stacked result to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def per_tensor_sumsq(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Sum of squares of each tensor, in float32, scattered to positions ``present`` of a zero vector of ``size``.

    One fused ``torch._foreach_norm`` pass over all tensors; missing tensors (no gradient) count as zero, so
    the vector has the same length on every rank.
    """
    out = torch.zeros(size, dtype=torch.float32, device=device)
    if tensors:
        norms = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
        out[torch.as_tensor(present, device=device)] = norms * norms
    return out


def per_tensor_absmax(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Largest absolute value of each tensor (NaN if the tensor holds a NaN), scattered like :func:`per_tensor_sumsq`."""
    out = torch.zeros(size, dtype=torch.float32, device=device)
    if tensors:
        if device.type == "cpu":
            # On CPU the fused inf-norm takes a slow path (about 6x the per-tensor abs().amax() seen here).
            maxima = torch.stack([t.abs().amax() for t in tensors])
        else:
            maxima = torch.stack(torch._foreach_norm(list(tensors), float("inf")))
        out[torch.as_tensor(present, device=device)] = maxima.float()
    return out


def per_tensor_nonfinite(tensors: Sequence[Tensor], size: int, present: Sequence[int], device: torch.device) -> Tensor:
    """Count of NaN/Inf values in each tensor. One kernel per tensor: callers run it only when a norm is non-finite."""
    out = torch.zeros(size, dtype=torch.float32, device=device)
    if tensors:
        out[torch.as_tensor(present, device=device)] = torch.stack(
            [(~torch.isfinite(t)).sum() for t in tensors]
        ).float()
    return out


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
