"""One callback that runs the whole debugger: gradients, activations, hard examples and anomaly alerts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from lightning_llmdbg._lightning import Callback, LightningModule, Trainer
from lightning_llmdbg.callbacks.activation_probe import ActivationProbe
from lightning_llmdbg.callbacks.anomaly_alert import AnomalyAlert
from lightning_llmdbg.callbacks.gradient_monitor import GradientMonitor
from lightning_llmdbg.callbacks.hard_example_logger import HardExampleLogger
from lightning_llmdbg.signals import PREFIX, Signals

# Defaults fit for LLM training: every block's gradients every 25 steps (every step for the first 10, where
# initialisation and warm-up problems show) with update ratios; activations and hard examples every 100 steps.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gradients": {"groups": "blocks", "every_n_steps": 25, "warmup_steps": 10, "update_ratio": True},
    "activations": {"modules": "blocks", "every_n_steps": 100},
    "examples": {"k": 8, "every_n_steps": 100},
    "alerts": {},
}
PARTS = {"gradients": GradientMonitor, "activations": ActivationProbe, "examples": HardExampleLogger, "alerts": AnomalyAlert}

PartSpec = Union[bool, Mapping[str, Any], Callback]
# Where a part matches its configuration against the model; a ValueError there is a configuration error.
CONFIGURING_HOOKS = ("setup", "on_fit_start")


class LLMDebugger(Callback):
    """The debugger in one line: :class:`GradientMonitor`, :class:`ActivationProbe`, :class:`HardExampleLogger`
    and :class:`AnomalyAlert` with defaults fit for LLM training, each configurable or switched off.

    The parts run in that order inside this one callback (so that the alert rules see the same step's
    statistics), log the keys their own docstrings list, and keep their state in this callback's checkpoint
    entry. The progress bar gets a health field: ``gnorm`` (the last sampled total gradient norm) and
    ``llmdbg/alerts`` (the alert count, once there is one).

    Args:
        gradients: ``True`` for :class:`GradientMonitor` with ``DEFAULTS["gradients"]``, a dict of arguments
            that override them, a ready ``GradientMonitor``, or ``False`` to switch it off.
        activations: the same for :class:`ActivationProbe`.
        examples: the same for :class:`HardExampleLogger` (it needs per-example losses: see its docstring).
        alerts: the same for :class:`AnomalyAlert`.
        progress_bar: show the health field in the progress bar.

    Example::

        from pytorch_lightning import Trainer
        from lightning_llmdbg import LLMDebugger

        trainer = Trainer(callbacks=[LLMDebugger()])
        trainer = Trainer(callbacks=[LLMDebugger(examples=False, alerts={"action": "skip"})])
    """

    def __init__(
        self,
        gradients: PartSpec = True,
        activations: PartSpec = True,
        examples: PartSpec = True,
        alerts: PartSpec = True,
        progress_bar: bool = True,
    ) -> None:
        specs = {"gradients": gradients, "activations": activations, "examples": examples, "alerts": alerts}
        self.parts: dict[str, Callback] = {}
        for name, spec in specs.items():
            part = _build(name, spec)
            if part is not None:
                self.parts[name] = part
        if not self.parts:
            raise ValueError("LLMDebugger: every part is switched off (gradients, activations, examples, alerts all False).")
        self.progress_bar = bool(progress_bar)
        self._grad_norm: float | None = None
        self._unsubscribe = None

    @property
    def callbacks(self) -> list[Callback]:
        """The parts, in the order their hooks run; ``AnomalyAlert`` subscribes to the measuring ones among them."""
        return list(self.parts.values())

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("parts", {})
        if name in PARTS:
            if name in parts:
                return parts[name]
            raise AttributeError(f"LLMDebugger: the {name!r} part is switched off.")
        raise AttributeError(name)

    @property
    def state_key(self) -> str:
        # Constant, so that resuming with other parts switched on or off keeps the state of those in both runs.
        return "LLMDebugger"

    # -- the health field --------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._forward("on_fit_start", trainer, pl_module)
        monitor = self.parts.get("gradients")
        if self.progress_bar and isinstance(monitor, GradientMonitor):
            self._unsubscribe = monitor.subscribe(self._keep_grad_norm)

    def _keep_grad_norm(self, signals: Signals) -> None:
        total = next((v for k, v in signals.values.items() if k.startswith(f"{PREFIX}/grad_norm/total")), None)
        if total is not None:
            self._grad_norm = total

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._forward("on_train_batch_end", trainer, pl_module, *args)
        if self.progress_bar and self._grad_norm is not None:
            pl_module.log("gnorm", self._grad_norm, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._forward("teardown", trainer, pl_module, stage)
        self._stop_listening()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._forward("on_exception", trainer, pl_module, exception)
        self._stop_listening()  # Lightning calls no `teardown` after an exception

    def _stop_listening(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])

    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for name, part in self.parts.items():
            if hook not in CONFIGURING_HOOKS:
                getattr(part, hook)(*args, **kwargs)
                continue
            try:
                getattr(part, hook)(*args, **kwargs)
            except ValueError as err:  # a part's configuration does not fit this model: say which part, and how
                raise ValueError(
                    f"LLMDebugger, part {name!r}: {err} Configure it with `LLMDebugger({name}={{...}})`, or switch it "
                    f"off with `LLMDebugger({name}=False)`."
                ) from err


def _build(name: str, spec: PartSpec) -> Callback | None:
    cls = PARTS[name]
    if spec is False or spec is None:
        return None
    if spec is True:
        return cls(**DEFAULTS[name])
    if isinstance(spec, Mapping):
        return cls(**{**DEFAULTS[name], **spec})
    if isinstance(spec, cls):
        return spec
    raise ValueError(
        f"LLMDebugger: `{name}` must be True, False, a dict of {cls.__name__} arguments or a {cls.__name__}, got {spec!r}."
    )


def _forwarding(hook: str):
    def forward(self: LLMDebugger, *args: Any, **kwargs: Any) -> None:
        self._forward(hook, *args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"Runs ``{hook}`` of every part."
    return forward


# Every other Callback hook runs each part's hook in order.
for _hook in [n for n in dir(Callback) if (n.startswith("on_") or n == "setup") and callable(getattr(Callback, n))]:
    if _hook not in vars(LLMDebugger):
        setattr(LLMDebugger, _hook, _forwarding(_hook))
