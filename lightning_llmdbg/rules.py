"""Anomaly rules: pure functions of one step's values and the recent history of each signal; no Lightning, no tensors.

A rule is a small class with thresholds whose defaults say where they come from. :func:`evaluate` runs rules over
a step's values (metric key -> float, the keys the writers log, plus ``"loss"``) against a :class:`History` of
earlier values and returns the :class:`Anomaly` verdicts; the caller then adds the values to the history.
Baselines are medians and median absolute deviations over a bounded window, so that one spike (or a few) neither
triggers nor pollutes them.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_llmdbg.sampling import require_int

LOSS_KEY = "loss"
MAD_TO_SIGMA = 1.4826  # 1.4826 * MAD estimates the standard deviation of Gaussian data


@dataclass(frozen=True)
class Anomaly:
    """One rule's verdict on one signal at one step.

    Attributes:
        rule: the rule's name (``"spike"``, ``"nonfinite"``, ...).
        signal: the signal's key (``"llmdbg/grad_norm/block_3"``, ``"loss"``).
        group: the group, module or parameter it names (``"block_3"``, ``"loss"``).
        step: the optimizer step.
        value: the offending value.
        threshold: the limit it crossed (NaN where there is none, e.g. a non-finite value).
        message: one sentence for a human.
        level: ``"WARN"`` or ``"ERROR"``.
    """

    rule: str
    signal: str
    group: str
    step: int
    value: float
    threshold: float
    message: str
    level: str = "WARN"

    @property
    def title(self) -> str:
        """Under 64 characters (W&B's limit), naming rule and group."""
        return f"llmdbg {self.rule}: {self.group}"[:63]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "signal": self.signal, "group": self.group, "step": self.step,
            "value": self.value, "threshold": self.threshold, "message": self.message, "level": self.level,
        }


def group_of(key: str) -> str:
    """The group a signal key names: ``llmdbg/grad_norm/block_3`` -> ``block_3``, ``llmdbg/act/block_1/dead_frac``
    -> ``block_1``, ``loss`` -> ``loss``."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[0] == "llmdbg":
        return parts[2]
    return key


class History:
    """The last ``window`` finite values of each signal (bounded deques: memory does not grow with the run).

    Args:
        window: values kept per signal (OLMo-core's ``StabilityMonitorCallback`` uses 128).
    """

    def __init__(self, window: int = 128) -> None:
        require_int("window", window, minimum=2)
        self.window = window
        self._values: dict[str, deque[float]] = {}

    def get(self, key: str) -> Sequence[float]:
        return self._values.get(key, ())

    def add(self, values: Mapping[str, float]) -> None:
        """Append each finite value; non-finite values are the non-finite rule's business, not a baseline's."""
        for key, value in values.items():
            if math.isfinite(value):
                self._values.setdefault(key, deque(maxlen=self.window)).append(float(value))

    def names(self) -> list[str]:
        return list(self._values)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "values": {k: list(v) for k, v in self._values.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._values = {k: deque(map(float, v), maxlen=self.window) for k, v in state.get("values", {}).items()}


def robust_baseline(history: Sequence[float]) -> tuple[float, float]:
    """Median and ``1.4826 * MAD`` (a standard deviation estimate that a few outliers do not move)."""
    median = statistics.median(history)
    mad = statistics.median(abs(v - median) for v in history)
    return median, MAD_TO_SIGMA * mad


class Rule:
    """A rule checks the signals whose keys match one of ``patterns`` (globs), each against its own history.

    Subclasses set ``name``, ``level`` and ``patterns`` and implement :meth:`check`.
    """

    name = "rule"
    level = "WARN"
    patterns: tuple[str, ...] = ()

    def applies(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.patterns)

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        raise NotImplementedError

    def _anomaly(self, key: str, step: int, value: float, threshold: float, message: str) -> Anomaly:
        return Anomaly(self.name, key, group_of(key), step, value, threshold, message, self.level)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _require_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")


def _require_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(patterns, str) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"`patterns` must be a non-empty list of globs over signal keys, got {patterns!r}.")
    return tuple(patterns)


class NonFinite(Rule):
    """NaN or Inf in the loss or in any gradient. Checked on every optimizer step by the callback itself (before the
    optimizer applies the update), not from sampled signals; this class only words the verdict.

    Args:
        scaler_patience: with a GradScaler, overflowing gradients are expected: the scaler skips that step and
            halves its scale, so they are logged as info. After this many consecutive overflow steps it is an
            anomaly after all: from torch's default ``init_scale=2**16`` and ``backoff_factor=0.5``, 16 halvings
            bring the scale to 1, below which overflow is no longer a scaling problem.
    """

    name = "nonfinite"
    level = "ERROR"

    def __init__(self, scaler_patience: int = 16) -> None:
        require_int("scaler_patience", scaler_patience, minimum=1)
        self.scaler_patience = scaler_patience

    def verdict(
        self, step: int, loss: float, offenders: Sequence[tuple[str, str, int]], elsewhere: bool = False
    ) -> Anomaly:
        """``offenders``: this rank's ``(parameter name, group, count of NaN/Inf values)``, in model order;
        ``elsewhere``: the non-finite gradients are on another rank (none here)."""
        if not math.isfinite(loss):
            return Anomaly(self.name, LOSS_KEY, LOSS_KEY, step, loss, math.nan, f"loss is {loss} at step {step}", self.level)
        if not offenders and elsewhere:
            return Anomaly(self.name, "llmdbg/grad_norm/total", "total", step, math.nan, math.nan,
                           f"non-finite gradient values on another rank at step {step}", self.level)
        if not offenders:  # finite values whose norm overflowed float32: as bad, and nothing to name
            return Anomaly(self.name, "llmdbg/grad_norm/total", "total", step, math.inf, math.nan,
                           f"gradient norm overflows at step {step} (all values finite)", self.level)
        _, group, count = offenders[0]
        shown = ", ".join(f"{n} ({c})" for n, _, c in offenders[:5]) + (", ..." if len(offenders) > 5 else "")
        return Anomaly(self.name, f"llmdbg/grad_nonfinite/{group}", group, step, float(count), math.nan,
                       f"non-finite gradient values at step {step} in {len(offenders)} parameters: {shown}", self.level)


class Spike(Rule):
    r"""A value above a robust rolling baseline of the signal's last values (the history window, 128 by default).

    On the log scale, since losses and norms are positive and gradient norms roughly log-normal (a linear MAD flags
    their ordinary heavy right tail): ``log v > m + k * max(1.4826 * MAD, min_rel)``, with ``m`` and MAD the median
    and median absolute deviation of the logs of the window. A value is a spike when it exceeds the median by a
    factor of ``exp(k * sigma)``, and by ``exp(k * min_rel)`` at least.

    Args:
        k: OLMo-core's ``StabilityMonitorCallback`` flags a value more than 6 standard deviations above the mean of
            the last 128 (``threshold_std=6.0``, ``window_size=128``); here the median and MAD stand in for mean and
            standard deviation, so that earlier spikes do not raise the bar.
        warmup: values the window must hold before the rule is active.
        min_rel: the spread (of the logs) never counts as less than this, so that a nearly constant signal is not
            flagged for a small move: at ``k=6`` a value must exceed 1.35x the median at least (Lightning's
            ``SpikeDetection`` uses ``rtol=2.0``: 3x its running mean).
        patterns: signal keys it watches: the loss, and the total and per-group gradient norms.
    """

    name = "spike"
    level = "WARN"

    def __init__(
        self,
        k: float = 6.0,
        warmup: int = 16,
        min_rel: float = 0.05,
        patterns: Sequence[str] = (LOSS_KEY, "llmdbg/grad_norm/*"),
    ) -> None:
        _require_positive("k", k)
        require_int("warmup", warmup, minimum=1)
        if isinstance(min_rel, bool) or not isinstance(min_rel, (int, float)) or min_rel < 0:
            raise ValueError(f"`min_rel` must be a number >= 0, got {min_rel!r}.")
        self.k, self.warmup, self.min_rel = float(k), warmup, float(min_rel)
        self.patterns = _require_patterns(patterns)

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if len(history) < self.warmup or not math.isfinite(value) or value <= 0:
            return None
        logs = [math.log(v) for v in history if v > 0]
        if len(logs) < self.warmup:
            return None
        median, sigma = robust_baseline(logs)
        limit = median + self.k * max(sigma, self.min_rel)
        if math.log(value) <= limit:
            return None
        baseline, threshold = math.exp(median), math.exp(limit)
        return self._anomaly(key, step, value, threshold,
                             f"{key} = {value:.4g} at step {step}, {value / baseline:.1f}x its baseline {baseline:.4g} "
                             f"(limit {threshold:.4g})")


class ParamNormJump(Rule):
    """A group's parameter norm multiplied (or divided) by more than ``factor`` since its previous sample: weights
    overwritten or rescaled outside the optimizer (a bad checkpoint load, a buggy in-place edit).

    Args:
        factor: a doubling; with the usual learning rates a weight norm moves by a few percent between samples
            (under 1% per 25 steps on the reference GPT).
    """

    name = "param_norm_jump"
    level = "WARN"
    patterns = ("llmdbg/param_norm/*",)

    def __init__(self, factor: float = 2.0) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(f"`factor` must be a number > 1, got {factor!r}.")
        self.factor = float(factor)

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if not history or not math.isfinite(value) or history[-1] <= 0:
            return None
        previous = history[-1]
        if value > self.factor * previous or value < previous / self.factor:
            return self._anomaly(key, step, value, self.factor * previous,
                                 f"{key} = {value:.4g} at step {step}, {value / previous:.3g}x its previous {previous:.4g}")
        return None


class VanishingGradient(Rule):
    """A group's gradient norm below an absolute floor, or orders of magnitude below its own baseline.

    Args:
        floor: SageMaker Debugger's ``vanishing_gradient`` rule flags a mean absolute gradient below ``1e-7``; an L2
            norm is at least the mean absolute value, so a norm below ``1e-7`` is flagged there too.
        drop: a norm below ``drop`` times the median of its own history (``1e-3``: three orders of magnitude).
        warmup: values the window must hold before the relative test is active (the floor is always active).
    """

    name = "vanishing_gradient"
    level = "WARN"
    patterns = ("llmdbg/grad_norm/*",)

    def __init__(self, floor: float = 1e-7, drop: float = 1e-3, warmup: int = 16) -> None:
        _require_positive("floor", floor)
        _require_positive("drop", drop)
        require_int("warmup", warmup, minimum=1)
        self.floor, self.drop, self.warmup = float(floor), float(drop), warmup

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if not math.isfinite(value):
            return None
        if value < self.floor:
            return self._anomaly(key, step, value, self.floor, f"{key} = {value:.3g} at step {step}, below {self.floor:g}")
        if len(history) >= self.warmup:
            median = statistics.median(history)
            if value < self.drop * median:
                return self._anomaly(key, step, value, self.drop * median,
                                     f"{key} = {value:.3g} at step {step}, {median / max(value, 1e-300):.3g}x below "
                                     f"its baseline {median:.3g}")
        return None


class ExplodingGradient(Rule):
    """A gradient norm above an absolute ceiling.

    Args:
        ceiling: 100x the gradient-clipping norm of 1.0 that GPT-3, Llama and OLMo train with. (SageMaker Debugger's
            ``exploding_tensor`` only flags NaN/Inf, which :class:`NonFinite` covers.)
    """

    name = "exploding_gradient"
    level = "ERROR"
    patterns = ("llmdbg/grad_norm/*",)

    def __init__(self, ceiling: float = 100.0) -> None:
        _require_positive("ceiling", ceiling)
        self.ceiling = float(ceiling)

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if math.isfinite(value) and value > self.ceiling:
            return self._anomaly(key, step, value, self.ceiling, f"{key} = {value:.4g} at step {step}, above {self.ceiling:g}")
        return None


class UpdateRatio(Rule):
    r"""The update-to-weight ratio :math:`\|\Delta W\|/\|W\|` of a group outside a band.

    Args:
        low: SageMaker Debugger's ``weight_update_ratio`` ``small_threshold`` (``1e-8``): below it the group is not
            learning at all (a learning-rate schedule that decays to near zero stays above it).
        high: two orders of magnitude above the ~1e-3 that cs231n's notes call healthy; at 0.1 one step moves the
            weights by a tenth of their norm. (SageMaker's ``large_threshold`` of 10 only catches blow-ups.)
        warmup_steps: the band applies from this optimizer step on. Adam's first updates are about the learning
            rate per element, so on freshly initialised weights the ratio is about lr / rms(W): 0.1 for lr 2e-3 on
            GPT-2's std-0.02 init, an ordinary start (the demo's first alert before this existed).
    """

    name = "update_ratio"
    level = "WARN"
    patterns = ("llmdbg/update_ratio/*",)

    def __init__(self, low: float = 1e-8, high: float = 0.1, warmup_steps: int = 50) -> None:
        _require_positive("low", low)
        _require_positive("high", high)
        if low >= high:
            raise ValueError(f"`low` must be below `high`, got low={low!r}, high={high!r}.")
        require_int("warmup_steps", warmup_steps, minimum=0)
        self.low, self.high, self.warmup_steps = float(low), float(high), warmup_steps

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if not math.isfinite(value) or step < self.warmup_steps:
            return None
        if value > self.high:
            return self._anomaly(key, step, value, self.high, f"{key} = {value:.3g} at step {step}, above {self.high:g}")
        if value < self.low:
            return self._anomaly(key, step, value, self.low, f"{key} = {value:.3g} at step {step}, below {self.low:g}")
        return None


class DeadUnits(Rule):
    """More than ``max_frac`` of a layer's channels never positive over a whole sampled batch (ActivationProbe).

    Args:
        max_frac: SageMaker Debugger's ``dead_relu`` rule flags a layer when more than 50% of its units are
            inactive (``threshold_layer=50.0`` percent).
        ignore: globs over module names left out. By default the transformer blocks' outputs (``block_<n>``, what
            ActivationProbe probes by default): they are the residual stream, not units, and in healthy runs many of
            its channels keep one sign over a whole batch (the reference GPT's block 1 reaches 52% by step 50;
            see also "Massive Activations in Large Language Models", Sun et al. 2024). Probe the MLP's activation
            (``ActivationProbe(modules=["*.mlp.act"])`` or the model's name for it) to watch dead units.
    """

    name = "dead_units"
    level = "WARN"
    patterns = ("llmdbg/act/*/dead_frac",)

    def __init__(self, max_frac: float = 0.5, ignore: Sequence[str] = ("block_*",)) -> None:
        if isinstance(max_frac, bool) or not isinstance(max_frac, (int, float)) or not 0 < max_frac < 1:
            raise ValueError(f"`max_frac` must be between 0 and 1, got {max_frac!r}.")
        if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
            raise ValueError(f"`ignore` must be a sequence of glob strings, got {ignore!r}.")
        self.max_frac = float(max_frac)
        self.ignore = tuple(ignore)

    def applies(self, key: str) -> bool:
        return super().applies(key) and not any(fnmatch.fnmatchcase(group_of(key), p) for p in self.ignore)

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if math.isfinite(value) and value > self.max_frac:
            return self._anomaly(key, step, value, self.max_frac,
                                 f"{value:.0%} of the channels of {group_of(key)} are dead at step {step}")
        return None


class AttentionEntropyDrop(Rule):
    """Attention entropy fallen sharply against its own baseline: entropy collapse (Zhai et al. 2023, "Stabilizing
    Transformer Training by Preventing Attention Entropy Collapse", see attention heads concentrating on one token
    just before divergence).

    Args:
        ratio: flag when the entropy is below this fraction of the median of its history (half).
        warmup: values the window must hold first (activations are sampled rarely: 8 samples).
    """

    name = "attention_entropy"
    level = "WARN"
    patterns = ("llmdbg/attn/*/entropy_mean", "llmdbg/attn/*/entropy_min")

    def __init__(self, ratio: float = 0.5, warmup: int = 8) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"`ratio` must be between 0 and 1, got {ratio!r}.")
        require_int("warmup", warmup, minimum=1)
        self.ratio, self.warmup = float(ratio), warmup

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if len(history) < self.warmup or not math.isfinite(value):
            return None
        median = statistics.median(history)
        if median > 0 and value < self.ratio * median:
            return self._anomaly(key, step, value, self.ratio * median,
                                 f"{key} = {value:.3g} at step {step}, down from its baseline {median:.3g}")
        return None


class OutlierGrowth(Rule):
    """Growth of outlier features (LLM.int8's hidden dimensions with |x| >= 6 at >= 6% of positions, Dettmers et al.
    2022) in a layer: more than ``factor`` times its baseline, and by at least ``min_increase`` dimensions.

    Args:
        factor: a doubling of the count against the median of its history.
        min_increase: so that 0 -> 1 or 1 -> 2 outlier dimensions is not an alert.
        warmup: values the window must hold first (8 samples).
    """

    name = "outlier_features"
    level = "WARN"
    patterns = ("llmdbg/act/*/outliers",)

    def __init__(self, factor: float = 2.0, min_increase: int = 4, warmup: int = 8) -> None:
        _require_positive("factor", factor)
        require_int("min_increase", min_increase, minimum=1)
        require_int("warmup", warmup, minimum=1)
        self.factor, self.min_increase, self.warmup = float(factor), min_increase, warmup

    def check(self, key: str, value: float, history: Sequence[float], step: int) -> Anomaly | None:
        if len(history) < self.warmup or not math.isfinite(value):
            return None
        median = statistics.median(history)
        threshold = max(self.factor * median, median + self.min_increase)
        if value > threshold:
            return self._anomaly(key, step, value, threshold,
                                 f"{group_of(key)} has {value:.0f} outlier feature dimensions at step {step}, up from "
                                 f"{median:.0f}")
        return None


def default_rules() -> list[Rule]:
    """Every rule with its default thresholds, most specific first (the first rule to flag a signal names it).

    Two spike rules: the loss is smooth, so 1.35x its median is already a spike; per-group gradient norms of a
    healthy run wander by 2x between samples as training moves on (block 1 of the reference GPT reached 2.1x its
    median at step 625 of a clean run), so they must exceed 3.3x their median (``min_rel=0.2``; Lightning's
    ``SpikeDetection`` asks for 3x its running mean too).
    """
    return [NonFinite(), ExplodingGradient(), VanishingGradient(), Spike(patterns=(LOSS_KEY,)),
            Spike(min_rel=0.2, patterns=("llmdbg/grad_norm/*",)), ParamNormJump(), UpdateRatio(), DeadUnits(),
            AttentionEntropyDrop(), OutlierGrowth()]


def evaluate(rules: Iterable[Rule], values: Mapping[str, float], history: History, step: int) -> list[Anomaly]:
    """Every anomaly the rules find in ``values`` against ``history`` (which this does not change).

    At most one anomaly per signal: the first rule (in ``rules`` order) that flags it.
    """
    rules = [r for r in rules if r.patterns]
    found = []
    for key, value in values.items():
        for rule in rules:
            if rule.applies(key):
                anomaly = rule.check(key, float(value), history.get(key), step)
                if anomaly is not None:
                    found.append(anomaly)
                    break
    return found
