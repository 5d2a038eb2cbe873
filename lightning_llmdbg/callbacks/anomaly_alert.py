"""Anomaly alerts: rules over the loss and the signals other callbacks publish; alert, and skip, stop or raise alike on
every rank."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_llmdbg import distributed
from lightning_llmdbg import rules as rules_
from lightning_llmdbg._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_llmdbg.rules import LOSS_KEY, Anomaly, History, NonFinite, Rule
from lightning_llmdbg.sampling import require_int
from lightning_llmdbg.selection import resolve_groups
from lightning_llmdbg.signals import PREFIX, Signals, signal_sources
from lightning_llmdbg.writers import HEALTH_CATEGORY, Writers

log = logging.getLogger("lightning_llmdbg")

ACTIONS = ("warn", "skip", "stop", "raise")


class TrainingAnomalyError(RuntimeError):
    """Raised (on every rank alike) by ``AnomalyAlert(action="raise")``; ``.anomaly`` is the :class:`Anomaly`."""

    def __init__(self, anomaly: Anomaly) -> None:
        self.anomaly = anomaly
        super().__init__(
            f"{anomaly.rule} on {anomaly.group} (signal {anomaly.signal}) at step {anomaly.step}: "
            f"value {anomaly.value:.6g}. {anomaly.message}"
        )


def load_anomaly_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Load a reproduction bundle written by :class:`AnomalyAlert` (tensors and plain containers only).

    Returns a dict with ``step``, ``rank``, ``batches`` (the step's micro-batches, on the CPU), ``rng`` (``torch``,
    ``cuda``, ``python``, ``numpy`` states at the start of the step), ``history`` (signal key -> recent values),
    ``loss`` (the step's loss, the mean over ranks, NaN when the step was not checked) and ``anomalies`` (each
    :meth:`Anomaly.as_dict`). Restore the random state with
    ``torch.set_rng_state(bundle["rng"]["torch"])`` (and ``torch.cuda.set_rng_state_all(bundle["rng"]["cuda"])``).
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain(obj: Any) -> Any:
    """Tensors (detached, on the CPU) and plain containers, so that ``torch.load(weights_only=True)`` reads them."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return repr(obj)


def _rng_states() -> dict[str, Any]:
    """The random states as they are (cheap to take every step); :func:`_plain_rng` converts them when saved."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    return states


def _plain_rng(states: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _plain(v) for k, v in states.items() if k != "numpy"}
    if "numpy" in states:  # numpy arrays are not readable with weights_only=True: a tensor of the same numbers
        kind, keys, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


class AnomalyAlert(Callback):
    r"""Catch loss and gradient anomalies; alert in W&B, TensorBoard and logging; and optionally skip the bad
    optimizer step, stop the run cleanly or raise -- on every rank alike.

    Signals come from two places, never recomputed:

    - On every optimizer step, in ``on_before_optimizer_step`` (before clipping and before the optimizer applies
      the update), the callback itself checks the loss (from ``on_before_backward``, AMP scale removed, summed over
      micro-batches) and whether any gradient is NaN/Inf: one fused norm pass on the device, then one small
      all-reduce of ``[loss, sum of gradient norms]`` across ranks and one device-to-host transfer. The loss the
      rules see is the mean over ranks, so it is the same number on every rank.
    - Every :class:`~lightning_llmdbg.signals.SignalSource` in ``trainer.callbacks`` or in an ``LLMDebugger`` (``GradientMonitor``,
      ``ActivationProbe``) is subscribed to at fit start: its sampled statistics (gradient, parameter and update
      norms, activation statistics) are checked as soon as they are published, whichever order the callbacks are
      listed in. These values are already reduced across ranks, so every rank reaches the same verdict without
      another collective.

    A GradScaler's overflow steps (non-finite gradients with a finite loss under ``16-mixed``) are what the scaler
    skips by design: they are logged as info and counted, not alerted, unless ``scaler_patience`` of them come in a
    row (see :class:`~lightning_llmdbg.rules.NonFinite`).

    Actions, the same on every rank:

    - ``"warn"``: alert only.
    - ``"skip"``: the optimizer step is not applied: every gradient is set to None before ``optimizer.step``, which
      then leaves parameters and optimizer state (moments, step counts) untouched. Counted and logged. Anomalies
      known only after the step (update ratios, activations) cannot undo it and are alerted only.
    - ``"stop"``: the bad step is not applied either (as with ``"skip"``, when the anomaly is known before the
      update), and ``trainer.should_stop = True``: the run ends cleanly after this batch, checkpoints and loggers
      as at a normal end, with the last good weights.
    - ``"raise"``: :class:`TrainingAnomalyError` naming rule, signal, group, step and value.

    Where alerts go (global rank zero): W&B ``run.alert`` (title ``llmdbg <rule>: <group>``, level WARN or ERROR by
    rule), TensorBoard text ``llmdbg/alerts``, Python logging (logger ``lightning_llmdbg``), ``on_anomaly`` if given,
    and the progress bar. The same title alerts again only after ``wait_duration`` seconds (W&B is told the same).

    Logged keys:

    - ``llmdbg/alerts``: TensorBoard text, one entry per alert.
    - ``llmdbg/alerts/count``: anomalies found so far (rate-limited ones included).
    - ``llmdbg/alerts/skipped_steps``: optimizer steps not applied (``action="skip"`` or ``"stop"``).
    - ``llmdbg/alerts/scaler_overflows``: steps a GradScaler skipped for overflow (info, not alerts).
    - ``llmdbg/alerts`` in the progress bar: the count, once there is one.

    TensorBoard custom scalars: the count in the one-page ``llmdbg: health`` category, every ``llmdbg/alerts/*``
    scalar in ``llmdbg: alerts``.

    Reproduction bundle: on an anomaly, ``<log_dir>/llmdbg/anomalies/step_<N>.pt`` (``step_<N>_rank<r>.pt`` from
    other ranks) holds the step's batches, the random states at its start, the recent signal history and the
    anomalies; read it with :func:`load_anomaly_bundle`. At most ``max_bundles`` are written per run.

    Checkpoints keep the baselines, counters and rate limits: a resumed run judges against the same baselines and
    does not alert again on what it alerted before.

    Args:
        rules: ``"default"`` (:func:`~lightning_llmdbg.rules.default_rules`) or a list of
            :class:`~lightning_llmdbg.rules.Rule` instances. Without a ``NonFinite`` rule and without a rule on
            ``"loss"`` nothing is checked on unsampled steps (no per-step cost at all).
        action: ``"warn"``, ``"skip"``, ``"stop"`` or ``"raise"``.
        window: values of each signal kept as its baseline (a bounded window; OLMo-core uses 128).
        wait_duration: seconds before the same alert title is sent again (W&B's ``wait_duration``).
        on_anomaly: called with each :class:`~lightning_llmdbg.rules.Anomaly` on global rank zero; an exception
            in it is reported, never raised.
        max_bundles: reproduction bundles written per run at most (0: none).

    Example::

        from pytorch_lightning import Trainer
        from lightning_llmdbg import AnomalyAlert, GradientMonitor

        trainer = Trainer(callbacks=[GradientMonitor(), AnomalyAlert(action="skip")])
    """

    def __init__(
        self,
        rules: str | Sequence[Rule] = "default",
        action: str = "warn",
        window: int = 128,
        wait_duration: float = 300.0,
        on_anomaly: Callable[[Anomaly], Any] | None = None,
        max_bundles: int = 16,
    ) -> None:
        if isinstance(rules, str):
            if rules != "default":
                raise ValueError(f'`rules` must be "default" or a list of Rule instances, got {rules!r}.')
            rules = rules_.default_rules()
        elif not rules or not all(isinstance(r, Rule) for r in rules):
            raise ValueError(f'`rules` must be "default" or a non-empty list of Rule instances, got {rules!r}.')
        if action not in ACTIONS:
            raise ValueError(f"`action` must be one of {ACTIONS}, got {action!r}.")
        if isinstance(wait_duration, bool) or not isinstance(wait_duration, (int, float)) or wait_duration < 0:
            raise ValueError(f"`wait_duration` must be a number of seconds >= 0, got {wait_duration!r}.")
        if on_anomaly is not None and not callable(on_anomaly):
            raise ValueError(f"`on_anomaly` must be callable, got {on_anomaly!r}.")
        require_int("max_bundles", max_bundles, minimum=0)
        self.rules = list(rules)
        self.action = action
        self.history = History(window)
        self.wait_duration = float(wait_duration)
        self.on_anomaly = on_anomaly
        self.max_bundles = max_bundles
        self._nonfinite = next((r for r in self.rules if isinstance(r, NonFinite)), None)
        self._check_every_step = self._nonfinite is not None or any(r.applies(LOSS_KEY) for r in self.rules)
        self._reset_counters()
        self._trainer: Trainer | None = None
        self._writers: Writers | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._names: dict[int, tuple[str, str]] = {}  # id(param) -> (name, group)
        self._bundle_dir: str | None = None
        self._loss: Tensor | None = None
        self._batches: list[Any] = []
        self._batch_step = -1
        self._rng: dict[str, Any] = {}
        self._step_anomalies: dict[int, list[Anomaly]] = {}
        self._checked_step = -1  # the last step whose every-step check ran
        self._skip_pending = -1  # a step to skip once the every-step check has looked at its gradients
        self._step_loss = math.nan  # the loss of the step last checked (mean over ranks)
        self._loss_seen = False  # whether any backward of this step went through Lightning (and so reached us)
        self._warned_no_loss = False

    def _reset_counters(self) -> None:
        self.alerts_total = 0
        self.skipped_steps_total = 0
        self.scaler_overflows = 0
        self.bundles_saved = 0
        self._consecutive_overflows = 0
        self._last_alert: dict[str, float] = {}  # title -> wall time, for the rate limit
        self._skipped_steps: deque[int] = deque(maxlen=8)  # steps whose late signals describe no real update

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._writers = Writers.for_trainer(trainer)
        # `log_dir` broadcasts from rank zero: every rank must ask, so ask here rather than on an anomaly.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._bundle_dir = os.path.join(log_dir, PREFIX, "anomalies")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._writers is not None:
            self._writers.custom_scalars(HEALTH_CATEGORY, {"alerts (count)": [rf"{PREFIX}/alerts/count$"]})
            self._writers.custom_scalars("llmdbg: alerts", {f"{PREFIX}/alerts": [rf"{PREFIX}/alerts/.*"]})
        self._unsubscribe_all()
        sources = signal_sources(trainer.callbacks)  # also the parts of an LLMDebugger
        self._unsubscribe = [source.subscribe(self._on_signals) for source in sources]
        # Name offending parameters by the groups GradientMonitor logs (its grouping when one is attached).
        spec = next((s.groups for s in sources if hasattr(s, "groups")), "blocks")
        try:
            resolved = resolve_groups(pl_module, spec, list(trainer.optimizers))
        except ValueError:
            resolved = resolve_groups(pl_module, "blocks")
        self._names = {id(p): (n, g) for g, members in resolved.groups.items() for n, p in members}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._batch_step:  # the first micro-batch of a step
            # References only (no copy); kept until the next step starts, since late signals (activations) of this
            # step may arrive in other callbacks' `on_train_batch_end`.
            self._batch_step = trainer.global_step
            self._loss_seen = False
            self._batches = []
            self._rng = _rng_states() if self.max_bundles > self.bundles_saved else {}
            self._step_anomalies = {}
        if self.bundles_saved < self.max_bundles:  # no reference held (device memory) when no bundle can be written
            self._batches.append(batch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not self._check_every_step:
            return
        self._loss_seen = True
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # The hook sees the scaled loss. Divide on the device: `get_scale()` would be a host sync per micro-batch.
            scale = getattr(scaler, "_scale", None)
            loss = loss / (scale.to(loss.device) if isinstance(scale, Tensor) else scaler.get_scale())
        self._loss = loss if self._loss is None else self._loss + loss  # each micro-batch's loss is already / n

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if self._check_every_step and not self._loss_seen and not self._warned_no_loss:
            self._warned_no_loss = True
            rank_zero_warn(
                f"AnomalyAlert: step {step} reached the optimizer without a loss: training_step returned None, or "
                "manual optimization called `loss.backward()` (use `self.manual_backward(loss)`). Loss rules see "
                "nothing for such steps; the gradient checks still run."
            )
        found = self._check_step(trainer, optimizer, step) if self._check_every_step else []
        self._checked_step = step
        if found:
            self._handle(found, step, before_update=True)
        if self._skip_pending == step:  # asked for by a signal published before this hook ran
            self._skip(step)

    def _check_step(self, trainer: Trainer, optimizer: Any, step: int) -> list[Anomaly]:
        """The every-step check of the loss and of the gradients' finiteness: one collective, one host transfer."""
        grads = [distributed.local_part(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # A rank with neither gradients nor a loss (a skipped backward) still joins the collective, on the strategy's
        # device (NCCL cannot reduce a CPU tensor).
        device = grads[0].device if grads else (self._loss.device if self._loss is not None else trainer.strategy.root_device)
        has_loss = self._loss is not None
        loss = self._loss.to(device) if has_loss else torch.zeros((), device=device)
        self._loss = None
        # NaN/Inf in any gradient makes the sum of their norms non-finite: one fused pass, no per-tensor check.
        # In float32: fp16 gradients with a finite norm above 65504 would otherwise read as an overflow.
        gsum = torch.stack(torch._foreach_norm(grads, dtype=torch.float32)).sum() if grads else torch.zeros((), device=device)
        packed = torch.stack([loss.reshape(()), gsum])
        world = 1
        if distributed.is_distributed():
            torch.distributed.all_reduce(packed)  # the one collective of the per-step check, on every rank
            world = torch.distributed.get_world_size()
        loss_value, grad_sum = packed.tolist()  # the one device -> host transfer of the per-step check
        loss_value /= world
        self._step_loss = loss_value if has_loss else math.nan
        loss_finite, grads_finite = math.isfinite(loss_value), math.isfinite(grad_sum)
        found: list[Anomaly] = []
        if not (loss_finite and grads_finite) and self._nonfinite is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if loss_finite and scaler is not None and scaler.is_enabled():
                self._scaler_overflow(step)
            else:
                offenders = self._offenders(optimizer)
                found.append(self._nonfinite.verdict(step, loss_value, offenders, elsewhere=world > 1 and not offenders))
        else:
            self._consecutive_overflows = 0
        if has_loss and loss_finite:
            values = {LOSS_KEY: loss_value}
            found += rules_.evaluate(self.rules, values, self.history, step)
            self.history.add(values)
        return found

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.alerts_total:
            # batch_size given so that Lightning does not try to infer it from the batch.
            pl_module.log(f"{PREFIX}/alerts", float(self.alerts_total), prog_bar=True, logger=False, on_step=True,
                          on_epoch=False, batch_size=1)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` after an exception: unsubscribe here, or a reused GradientMonitor would
        # keep feeding this (finished) callback.
        self._unsubscribe_all()
        self._batches, self._loss, self._rng = [], None, {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unsubscribe_all()
        self._batches, self._loss, self._rng, self._names = [], None, {}, {}
        if self._writers is not None:
            self._writers.flush()

    def _unsubscribe_all(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    # -- signals -----------------------------------------------------------------------------------------------
    def _on_signals(self, signals: Signals) -> None:
        if signals.step in self._skipped_steps:
            return  # gradients of a skipped step were dropped: its norms and update ratios describe no real update
        values = {k: float(v) for k, v in signals.values.items()}
        found = rules_.evaluate(self.rules, values, self.history, signals.step)
        self.history.add(values)
        if found:
            self._handle(found, signals.step, before_update=signals.before_update)

    def _offenders(self, optimizer: Any) -> list[tuple[str, str, int]]:
        """Slow path, only on a non-finite step: this rank's parameters with NaN/Inf gradients, in model order."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return []
        counts = torch.stack([(~torch.isfinite(distributed.local_part(p.grad))).sum() for p in params]).tolist()
        return [(*self._names.get(id(p), (f"parameter_{i}", "other")), int(c)) for i, (p, c) in enumerate(zip(params, counts)) if c]

    def _scaler_overflow(self, step: int) -> None:
        self.scaler_overflows += 1
        self._consecutive_overflows += 1
        self._skipped_steps.append(step)
        log.info("step %d: GradScaler found non-finite gradients and skips this step by design (%d so far).",
                 step, self.scaler_overflows)
        if self._writers is not None:
            self._writers.scalars({f"{PREFIX}/alerts/scaler_overflows": float(self.scaler_overflows)}, step)
        if self._consecutive_overflows > self._nonfinite.scaler_patience:
            anomaly = Anomaly(self._nonfinite.name, "llmdbg/grad_norm/total", "total", step, math.inf, math.nan,
                              f"{self._consecutive_overflows} GradScaler overflow steps in a row at step {step}",
                              self._nonfinite.level)
            self._handle([anomaly], step, before_update=False)  # the scaler skips it already

    # -- actions -----------------------------------------------------------------------------------------------
    def _handle(self, found: list[Anomaly], step: int, before_update: bool) -> None:
        """Alert, save a bundle and act. Every rank calls this at the same point with the same verdicts."""
        self.alerts_total += len(found)
        self._step_anomalies.setdefault(step, []).extend(found)
        metrics = {f"{PREFIX}/alerts/count": float(self.alerts_total)}
        for anomaly in found:
            self._alert(anomaly)
        self._save_bundle(step)
        if self.action in ("skip", "stop") and before_update:  # a stopped run's last weights are good ones too
            if self._checked_step == step:
                self._skip(step)
            else:  # the every-step check has yet to see this step's gradients: it skips after looking
                self._skip_pending = step
        if self._writers is not None:
            self._writers.scalars(metrics, step)
        if self.action == "stop" and self._trainer is not None:
            self._trainer.should_stop = True
        elif self.action == "raise":
            if self._writers is not None:
                self._writers.flush()
            raise TrainingAnomalyError(found[0])

    def _skip(self, step: int) -> None:
        if step in self._skipped_steps:
            return
        # Torch optimizers leave a parameter whose `.grad` is None untouched: no update, no weight decay, no moment
        # or step-count change. Lightning calls this hook inside its closure, before `optimizer.step` reads them.
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        for optimizer in self._trainer.optimizers:
            if scaler is not None and scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
                # Lightning leaves unscaling of fused optimizers to `scaler.step`; with every gradient gone it would
                # record no inf check and `scaler.update()` would raise. Unscale (and record) first.
                state = scaler._per_optimizer_states[id(optimizer)]
                if state["stage"].name == "READY":
                    scaler.unscale_(optimizer)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self.skipped_steps_total += 1
        self._skipped_steps.append(step)
        log.warning("step %d: optimizer step skipped by AnomalyAlert (%d so far).", step, self.skipped_steps_total)
        if self._writers is not None:
            self._writers.scalars({f"{PREFIX}/alerts/skipped_steps": float(self.skipped_steps_total)}, step)

    def _alert(self, anomaly: Anomaly) -> None:
        if self._writers is None or not self._writers.enabled:
            return
        now = time.time()
        last = self._last_alert.get(anomaly.title)
        if last is None or now - last >= self.wait_duration:
            self._last_alert[anomaly.title] = now
            try:
                self._writers.alert(anomaly.title, anomaly.message, anomaly.step, anomaly.level, self.wait_duration)
            except Exception as err:  # noqa: BLE001 - an alert back end must never cost the run
                rank_zero_warn(f"AnomalyAlert: could not send the alert {anomaly.title!r}: {err!r}")
        else:
            log.info("%s (step %d, rate-limited): %s", anomaly.title, anomaly.step, anomaly.message)
        if self.on_anomaly is not None:
            try:
                self.on_anomaly(anomaly)
            except Exception as err:  # noqa: BLE001 - the user's callable must never cost the run
                rank_zero_warn(f"AnomalyAlert: `on_anomaly` raised {err!r}; training continues.")

    def _save_bundle(self, step: int) -> None:
        if self._bundle_dir is None or self._trainer is None:
            return
        rank = self._trainer.global_rank
        name = f"step_{step}.pt" if rank == 0 else f"step_{step}_rank{rank}.pt"
        path = os.path.join(self._bundle_dir, name)
        new = not os.path.exists(path)
        if new and self.bundles_saved >= self.max_bundles:
            return
        bundle = {
            "step": step,
            "rank": rank,
            "batches": _plain(self._batches) if self._batch_step == step else [],
            "rng": _plain_rng(self._rng) if self._batch_step == step else {},
            "loss": self._step_loss if self._checked_step == step else math.nan,
            "history": {k: list(self.history.get(k)) for k in self.history.names()},
            "anomalies": [a.as_dict() for a in self._step_anomalies.get(step, [])],
        }
        try:
            os.makedirs(self._bundle_dir, exist_ok=True)
            torch.save(bundle, path)
            self.bundles_saved += int(new)
        except Exception as err:  # noqa: BLE001 - a full disk must not cost the run
            rank_zero_warn(f"AnomalyAlert: could not write the reproduction bundle {path}: {err!r}")

    # -- checkpoint state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "alerts_total": self.alerts_total,
            "skipped_steps_total": self.skipped_steps_total,
            "scaler_overflows": self.scaler_overflows,
            "consecutive_overflows": self._consecutive_overflows,
            "bundles_saved": self.bundles_saved,
            "last_alert": dict(self._last_alert),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict.get("history", {}))
        self.alerts_total = int(state_dict.get("alerts_total", 0))
        self.skipped_steps_total = int(state_dict.get("skipped_steps_total", 0))
        self.scaler_overflows = int(state_dict.get("scaler_overflows", 0))
        self._consecutive_overflows = int(state_dict.get("consecutive_overflows", 0))
        self.bundles_saved = int(state_dict.get("bundles_saved", 0))
        self._last_alert = {str(k): float(v) for k, v in state_dict.get("last_alert", {}).items()}
