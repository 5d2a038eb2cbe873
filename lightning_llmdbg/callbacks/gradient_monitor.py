"""Per-group gradient norms, maxima, parameter norms, non-finite counts and update ratios on sampled steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_llmdbg import distributed, stats
from lightning_llmdbg._lightning import Callback, LightningModule, Trainer, rank_zero_info, rank_zero_warn
from lightning_llmdbg.sampling import SampledStepCounters, SamplingSchedule, require_int
from lightning_llmdbg.selection import GroupSpec, resolve_groups, validate_group_spec
from lightning_llmdbg.signals import PREFIX, SignalSource, Signals
from lightning_llmdbg.writers import HEALTH_CATEGORY, Writers


@dataclass
class _Plan:
    """The parameters one optimizer steps, in a fixed order, with their group and how they are sharded."""

    names: list[str]
    params: list[Tensor]
    group_names: list[str]
    group_index: Tensor  # [P] group of each parameter
    group_positions: list[int]  # the same on the host
    shard_keys: list[tuple]  # distinct non-empty shard keys, same order on every rank
    shard_positions: list[list[int]]  # parameter positions per shard key
    total_key: str

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


class GradientMonitor(SampledStepCounters, Callback, SignalSource):
    r"""Log per-group gradient statistics on sampled optimizer steps.

    Measured in ``on_before_optimizer_step``: after AMP unscaling and gradient accumulation, before clipping.
    On each sampled step the statistics of all groups are computed on the device with fused ``foreach``
    kernels and reach the host as one tensor; on other steps nothing is computed.

    Logged keys (``<group>`` as chosen by ``groups``):

    - ``llmdbg/grad_norm/<group>``: L2 norm of the group's gradient.
    - ``llmdbg/grad_norm/total``: L2 norm of all gradients (``total_opt<i>`` per optimizer when there are several).
    - ``llmdbg/grad_absmax/<group>``: largest absolute gradient value.
    - ``llmdbg/param_norm/<group>``: L2 norm of the group's parameters (before the update).
    - ``llmdbg/grad_nonfinite/<group>``: number of NaN/Inf gradient values (the offending parameters are
      named in a warning and in the published :class:`~lightning_llmdbg.signals.Signals`).
    - ``llmdbg/update_ratio/<group>``: :math:`\|W_{t+1}-W_t\| / \|W_t\|` of the update the optimizer actually
      applied (``update_ratio=True``; costs a transient copy of the parameters on sampled steps).
    - ``llmdbg/grad_hist/<group>``: histogram of the group's finite gradient values (``histograms=True``).

    TensorBoard also gets a custom-scalars layout: one chart per family with all groups on it, and the gradient norm
    and update ratio charts in the one-page ``llmdbg: health`` category.

    Subscribers (:meth:`subscribe`) receive, per sampled step, a :class:`~lightning_llmdbg.signals.Signals` with
    the gradient statistics before the optimizer step (so that a rule can still act on it), and with
    ``update_ratio=True`` a second one with the update ratios once the step is taken.

    Distributed: with DDP the gradients are already averaged, so the values are computed locally and are the
    same on every rank. With FSDP2 (DTensor gradients) the local sums of squares, counts and maxima are
    all-reduced over the sharded mesh dimensions before the root is taken. DeepSpeed ZeRO stage 2 and 3
    partition gradients outside ``param.grad``: there the monitor measures only the gradients that are
    materialised in ``param.grad`` on each rank (none at all: no log for that step) and says so with a warning.

    Manual optimization and several optimizers: each ``optimizer.step()`` advances ``global_step``, so the schedule
    is read once per batch, at the step the batch starts on, and every optimizer that steps in a sampled batch is
    measured and logged at that step. A step with no gradient at all (``training_step`` returned None) is not
    measured, and a group none of whose parameters got a gradient logs no norm for that step.

    Args:
        groups: ``"blocks"`` (one group per transformer block, plus ``embeddings``, ``head`` and the remaining
            parameters by top-level module), ``"param_groups"`` (the optimizer's param groups, by their
            ``"name"`` when they carry one), ``"parameters"`` (each parameter alone), or a dict
            ``{group_name: glob or [globs]}`` over parameter names (leftovers go to ``other``).
        every_n_steps: sample every this many optimizer steps.
        warmup_steps: also sample every step before this one.
        update_ratio: log the update-to-weight ratio.
        histograms: log gradient histograms.
        histogram_bins: bins per histogram.
        absmax: log ``grad_absmax``. Each statistic is one more pass over memory on a sampled step: with
            ``absmax=False, param_norm=False`` a sampled step costs about one fused norm pass (see BENCHMARKS.md).
        param_norm: log ``param_norm``.

    Example::

        from pytorch_lightning import Trainer
        from lightning_llmdbg import GradientMonitor

        trainer = Trainer(callbacks=[GradientMonitor(groups="blocks", every_n_steps=50)])
    """

    signal_source_name = "gradient_monitor"

    def __init__(
        self,
        groups: GroupSpec = "blocks",
        every_n_steps: int = 25,
        warmup_steps: int = 10,
        update_ratio: bool = False,
        histograms: bool = False,
        histogram_bins: int = 64,
        absmax: bool = True,
        param_norm: bool = True,
    ) -> None:
        validate_group_spec(groups)
        self.schedule = SamplingSchedule(every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        require_int("histogram_bins", histogram_bins, minimum=1)
        self.groups = groups
        self.update_ratio = bool(update_ratio)
        self.histograms = bool(histograms)
        self.histogram_bins = histogram_bins
        self.absmax = bool(absmax)
        self.param_norm = bool(param_norm)
        self._plans: dict[int, _Plan] = {}
        self._writers: Writers | None = None
        # Per optimizer: (plan, step, parameters before the step, their sums of squares, groups without gradients),
        # until the step is taken.
        self._pending_updates: dict[int, tuple[_Plan, int, list[Tensor], Tensor, set[str]]] = {}
        # The step a batch starts on, and the optimizers measured in it: with manual optimization every
        # `optimizer.step()` advances `global_step`, so the schedule is read once per batch, not per optimizer.
        self._batch_step: int | None = None
        self._measured: set[int] = set()

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._writers = Writers.for_trainer(trainer)
        # Fail fast on globs that match nothing; with `configure_model` the parameters may not exist yet,
        # and the groups are built for real in `on_fit_start`, after the strategy has wrapped the model.
        if isinstance(self.groups, Mapping) and any(True for _ in pl_module.parameters()):
            self._resolve(pl_module, [])
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            stage_ = (getattr(trainer.strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0)
            if stage_ >= 2:
                rank_zero_warn(
                    f"GradientMonitor: DeepSpeed ZeRO stage {stage_} partitions gradients outside `param.grad`; "
                    "only gradients materialised in `param.grad` are measured: the logged norms are partial, and a step "
                    "with none materialised is not logged at all. "
                    "Use ZeRO stage 0/1 or FSDP2 for exact per-group norms."
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._forget_step()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            return
        resolved = self._resolve(pl_module, optimizers)
        if resolved.frozen:
            shown = ", ".join(resolved.frozen[:5]) + (", ..." if len(resolved.frozen) > 5 else "")
            rank_zero_info(f"GradientMonitor: skipping {len(resolved.frozen)} frozen parameters ({shown}).")
        group_order = {group: i for i, group in enumerate(resolved.groups)}
        group_of = {name: group for group, members in resolved.groups.items() for name, _ in members}
        named = {name: p for members in resolved.groups.values() for name, p in members}
        by_id = {id(p): name for name, p in named.items()}
        self._plans = {}
        for i, optimizer in enumerate(optimizers):
            names = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in by_id]
            if not names:
                continue
            total = "total" if len(optimizers) == 1 else f"total_opt{i}"
            names.sort(key=lambda n: group_order[group_of[n]])  # groups in model order, not optimizer order
            self._plans[id(optimizer)] = self._make_plan(names, [named[n] for n in names], group_of, total)
        if self._writers is not None:
            self._write_layout()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._batch_step:  # the first micro-batch of a step
            self._batch_step, self._measured = trainer.global_step, set()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step if self._batch_step is None else self._batch_step
        plan = self._plans.get(id(optimizer))
        if plan is None or not self.schedule.is_sampled(step) or id(optimizer) in self._measured:
            return
        # Taken now, for the update ratios too: a manual loop may zero the gradients right after `optimizer.step()`.
        without = _groups_without_gradients(plan)
        if len(without) == plan.num_groups:
            return  # no backward ran (training_step returned None): nothing to measure, and no zero to report
        self._measured.add(id(optimizer))
        values, details, param_sumsq = self._measure(plan, without)
        if self.update_ratio:
            self._pending_updates[id(optimizer)] = (plan, step, self._snapshot(plan), param_sumsq, without)
        if step != self.last_sampled_step:
            self._count_sample(step)
        self._emit(step, values, details, before_update=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        pending, self._pending_updates = self._pending_updates, {}
        for plan, step, before, param_sumsq, without in pending.values():
            ratios = self._update_ratios(plan, before, param_sumsq)
            ratios = {g: r for g, r in zip(plan.group_names, ratios) if g not in without}
            self._emit(step, {f"{PREFIX}/update_ratio/{g}": r for g, r in ratios.items()}, {})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._writers is not None:
            self._writers.flush()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._plans = {}
        self._forget_step()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._forget_step()  # Lightning calls no `teardown` after an exception

    def _forget_step(self) -> None:
        # The pending update holds a copy of the parameters: never keep it past the step (or the fit).
        self._pending_updates = {}
        self._batch_step, self._measured = None, set()

    def _resolve(self, pl_module: LightningModule, optimizers: list) -> Any:
        try:
            return resolve_groups(pl_module, self.groups, optimizers)
        except ValueError as err:
            raise ValueError(f"GradientMonitor(groups={self.groups!r}): {err}") from None

    # -- measurement -------------------------------------------------------------------------------------------
    def _make_plan(self, names: list[str], params: list[Tensor], group_of: dict[str, str], total: str) -> _Plan:
        group_names = list(dict.fromkeys(group_of[n] for n in names))
        position = {g: i for i, g in enumerate(group_names)}
        device = distributed.local_part(params[0]).device
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            key = distributed.shard_key(p)
            if key:
                keys.setdefault(key, []).append(i)
        return _Plan(
            names=names,
            params=params,
            group_names=group_names,
            group_index=torch.tensor([position[group_of[n]] for n in names], device=device),
            group_positions=[position[group_of[n]] for n in names],
            shard_keys=list(keys),
            shard_positions=list(keys.values()),
            total_key=total,
        )

    @staticmethod
    def _present(tensors: Sequence[Tensor | None]) -> tuple[list[Tensor], list[int]]:
        local = [(distributed.local_part(t), i) for i, t in enumerate(tensors) if t is not None]
        kept = [(t, i) for t, i in local if t.numel() > 0]
        return [t for t, _ in kept], [i for _, i in kept]

    def _per_param(self, plan: _Plan, tensors: Sequence[Tensor | None], absmax: bool) -> tuple[Tensor, Tensor | None]:
        """Per-parameter sums of squares (and maxima), reduced over shards: identical on every rank."""
        present, where = self._present(tensors)
        size, device = len(plan.params), plan.group_index.device
        sumsq = stats.per_tensor_sumsq(present, size, where, device).unsqueeze(0)
        maxes = stats.per_tensor_absmax(present, size, where, device) if absmax else None
        distributed.reduce_sharded(sumsq, maxes, plan.shard_keys, plan.shard_positions)
        return sumsq[0], maxes

    def _measure(self, plan: _Plan, without: set[str]) -> tuple[dict[str, float], dict[str, Any], Tensor | None]:
        """All statistics of a sampled step (none for the groups in ``without``, which got no gradient); returns the
        keyed values, details, and per-parameter sums of squares of the parameters (None unless needed) so that the
        update ratio does not measure them again."""
        grads = [p.grad for p in plan.params]
        G = plan.num_groups
        grad_sumsq, grad_max = self._per_param(plan, grads, absmax=self.absmax)
        need_params = self.param_norm or self.update_ratio
        param_sumsq = self._per_param(plan, [p.detach() for p in plan.params], absmax=False)[0] if need_params else None
        group_grad = stats.group_sum(grad_sumsq, plan.group_index, G)
        parts = [group_grad.sqrt(), group_grad.sum().sqrt().unsqueeze(0)]
        if self.absmax:
            parts.append(stats.group_max(grad_max, plan.group_index, G))
        if self.param_norm:
            parts.append(stats.group_sum(param_sumsq, plan.group_index, G).sqrt())
        packed = torch.cat(parts).cpu()  # the one device -> host transfer of a sampled step
        grad_norm, total, *rest = packed.split([G, 1] + [G] * (len(parts) - 2))
        absmax = rest.pop(0) if self.absmax else None
        param_norm = rest.pop(0) if self.param_norm else None

        values = {f"{PREFIX}/grad_norm/{g}": float(v) for g, v in zip(plan.group_names, grad_norm)}
        values[f"{PREFIX}/grad_norm/{plan.total_key}"] = float(total[0])
        if absmax is not None:
            values.update({f"{PREFIX}/grad_absmax/{g}": float(v) for g, v in zip(plan.group_names, absmax)})
        if param_norm is not None:
            values.update({f"{PREFIX}/param_norm/{g}": float(v) for g, v in zip(plan.group_names, param_norm)})

        details: dict[str, Any] = {}
        nonfinite_groups = torch.zeros(G)
        # NaN and Inf propagate into the sums and maxima, so finite totals prove there is nothing to count.
        nonfinite = not math.isfinite(float(total[0])) or (absmax is not None and not torch.isfinite(absmax).all())
        if plan.shard_keys:  # values of unsharded parameters are local: agree before running collectives
            nonfinite = distributed.agree_any(nonfinite, plan.group_index.device)
        if nonfinite:
            # Slow path, only on a step whose norms are non-finite (the same on every rank): count per parameter.
            present, where = self._present(grads)
            counts = stats.per_tensor_nonfinite(present, len(plan.params), where, plan.group_index.device).unsqueeze(0)
            distributed.reduce_sharded(counts, None, plan.shard_keys, plan.shard_positions)
            counts = counts[0].cpu()
            nonfinite_groups = stats.group_sum(counts, plan.group_index.cpu(), G)
            offenders = [(plan.names[i], int(c)) for i, c in enumerate(counts.tolist()) if c > 0]
            details["nonfinite_parameters"] = offenders
            if offenders:
                shown = ", ".join(f"{n} ({c})" for n, c in offenders[:5])
                rank_zero_warn(f"GradientMonitor: non-finite gradient values in {len(offenders)} parameters: {shown}.")
        values.update({f"{PREFIX}/grad_nonfinite/{g}": float(v) for g, v in zip(plan.group_names, nonfinite_groups)})
        # A group none of whose parameters got a gradient this step (unused in the forward pass) has no norm: a 0
        # would read as a vanishing gradient.
        for g in without:
            for family in ("grad_norm", "grad_absmax", "grad_nonfinite"):
                values.pop(f"{PREFIX}/{family}/{g}", None)
        if self.histograms:
            details["histograms"] = self._histograms(plan, grads, nonfinite_groups.tolist())
        return values, details, param_sumsq

    def _histograms(
        self, plan: _Plan, grads: Sequence[Tensor | None], nonfinite: Sequence[float]
    ) -> dict[str, stats.Histogram]:
        """Per group: a shared range over all shards first, then counts summed over shards."""
        out = {}
        bins = self.histogram_bins
        members: dict[int, list[int]] = {}
        for i, g in enumerate(plan.group_index.tolist()):
            members.setdefault(g, []).append(i)
        for g, idx in members.items():
            key = next((k for k in map(distributed.shard_key, (plan.params[i] for i in idx)) if k), ())
            tensors, _ = self._present([grads[i] for i in idx])
            lo, neg_hi = distributed.all_reduce_over(
                stats.finite_range(tensors).to(plan.group_index.device), key, "min"
            ).tolist()
            if not math.isfinite(lo):  # no finite value at all
                out[plan.group_names[g]] = stats.Histogram([], [], 0.0, 0.0, 0.0, 0.0, 0.0, int(nonfinite[g]))
                continue
            hi = -neg_hi
            counted = stats.histogram_counts(tensors, lo, hi, bins).to(plan.group_index.device)
            counted = distributed.all_reduce_over(counted, key, "sum").cpu()
            num, total, sumsq = counted[bins:].tolist()
            out[plan.group_names[g]] = stats.Histogram(
                counts=counted[:bins].tolist(),
                edges=stats.histogram_edges(lo, hi, bins),
                min=lo,
                max=hi,
                num=num,
                sum=total,
                sum_squares=sumsq,
                nonfinite=int(nonfinite[g]),
            )
        return out

    @staticmethod
    def _snapshot(plan: _Plan) -> list[Tensor]:
        return torch._foreach_mul([distributed.local_part(p.detach()) for p in plan.params], 1.0)

    def _update_ratios(self, plan: _Plan, before: list[Tensor], param_sumsq: Tensor) -> list[float]:
        after = [distributed.local_part(p.detach()) for p in plan.params]
        torch._foreach_sub_(before, after)  # `before` now holds -ΔW; no second copy
        delta_sumsq, _ = self._per_param(plan, before, absmax=False)
        G = plan.num_groups
        ratio = stats.group_sum(delta_sumsq, plan.group_index, G).sqrt() / stats.group_sum(
            param_sumsq, plan.group_index, G
        ).sqrt().clamp_min(1e-30)
        return ratio.cpu().tolist()

    # -- output ------------------------------------------------------------------------------------------------
    def _emit(self, step: int, values: dict[str, float], details: dict[str, Any], before_update: bool = False) -> None:
        histograms = details.pop("histograms", {})
        self._publish(Signals(self.signal_source_name, step, values, details, before_update=before_update))
        if self._writers is None:
            return
        self._writers.scalars(values, step)
        for group, hist in histograms.items():
            self._writers.histogram(f"{PREFIX}/grad_hist/{group}", hist, step)

    def _write_layout(self) -> None:
        families = ["grad_norm"] + ["grad_absmax"] * self.absmax + ["param_norm"] * self.param_norm
        families += ["grad_nonfinite"] + ["update_ratio"] * self.update_ratio
        self._writers.custom_scalars(
            "llmdbg: gradients", {f"{PREFIX}/{f}": [rf"{PREFIX}/{f}/.*"] for f in families}
        )
        health = {"gradient norm by group": [rf"{PREFIX}/grad_norm/.*"]}
        if self.update_ratio:
            health["update / weight ratio by group"] = [rf"{PREFIX}/update_ratio/.*"]
        self._writers.custom_scalars(HEALTH_CATEGORY, health)


def _groups_without_gradients(plan: _Plan) -> set[str]:
    with_grad = {plan.group_positions[i] for i, p in enumerate(plan.params) if p.grad is not None}
    return {g for i, g in enumerate(plan.group_names) if i not in with_grad}
