"""Reductions across processes. Every function here runs the same collectives on every rank, in the same order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]

ShardKey = tuple  # the process groups a sharded tensor is split over, one per sharded mesh dimension


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_part(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_key(t: Tensor) -> ShardKey:
    """The process groups over which ``t`` is sharded (empty for a plain or fully replicated tensor).

    Sums of local values must be all-reduced over exactly these groups: summing over a replicated mesh
    dimension would count the same values twice.
    """
    if not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(t.placements) if isinstance(placement, Shard))


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_over(t: Tensor, key: ShardKey, op: str = "sum") -> Tensor:
    """In place: reduce ``t`` over each process group of ``key`` in turn (a no-op for an empty key).

    Reducing over each sharded mesh dimension in turn is a reduction over all shards of a tensor.
    """
    for group in key:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return t


def reduce_sharded(
    sums: Tensor, maxes: Tensor | None, keys: Sequence[ShardKey], positions: Sequence[Sequence[int]]
) -> None:
    """In place: all-reduce (SUM) columns of ``sums`` and (MAX) entries of ``maxes`` that belong to sharded tensors.

    Args:
        sums: ``[k, P]`` per-tensor partial sums (sums of squares, counts).
        maxes: ``[P]`` per-tensor partial maxima, or None.
        keys: distinct non-empty shard keys, in the same order on every rank.
        positions: for each key, the tensor positions sharded that way.
    """
    for key, idx in zip(keys, positions):
        index = torch.as_tensor(idx, device=sums.device)
        sums[:, index] = all_reduce_over(sums[:, index].contiguous(), key, "sum")
        if maxes is not None:
            maxes[index] = all_reduce_over(maxes[index].contiguous(), key, "max")


def agree_any(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank: the way a decision to skip or stop is agreed."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reduce_partials(
    sums_by_key: dict[str, Tensor], maxes_by_key: dict[str, Tensor], keys: Sequence[str], device: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Sum partial sums and max maxima over all ranks, after agreeing on each key's size (three collectives).

    A rank on which a module never ran (or that saw no batch) contributes zeros (or -inf) of the agreed size, so
    the same collectives run everywhere and none can hang.
    """
    if not is_distributed() or not keys:
        return dict(sums_by_key), dict(maxes_by_key)
    sizes = torch.tensor(
        [[sums_by_key[k].numel() if k in sums_by_key else 0, maxes_by_key[k].numel() if k in maxes_by_key else 0] for k in keys],
        dtype=torch.int64,
        device=device,
    ).reshape(-1, 2)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    sum_sizes, max_sizes = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    flat_sums = torch.cat(
        [sums_by_key[k].to(device, torch.float64) if k in sums_by_key else torch.zeros(n, dtype=torch.float64, device=device) for k, n in zip(keys, sum_sizes)]
    )
    flat_maxes = torch.cat(
        [maxes_by_key[k].to(device, torch.float32) if k in maxes_by_key else torch.full((n,), float("-inf"), device=device) for k, n in zip(keys, max_sizes)]
    )
    dist.all_reduce(flat_sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(flat_maxes, op=dist.ReduceOp.MAX)
    sums, maxes = {}, {}
    for key, part in zip(keys, flat_sums.split(sum_sizes)):
        if part.numel():
            sums[key] = part
    for key, part in zip(keys, flat_maxes.split(max_sizes)):
        if part.numel():
            maxes[key] = part
    return sums, maxes


def all_gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``[n_r, ...]`` rows, concatenated in rank order, on every rank (two collectives).

    The ranks first agree on the largest ``n_r`` (one host synchronisation), then gather rows padded to it.
    """
    if not is_distributed():
        return rows
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank. For small host data on rare steps only."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
