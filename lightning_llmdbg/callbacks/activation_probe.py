"""Activation statistics of chosen layers, from forward (and optionally backward) hooks on sampled steps only."""

from __future__ import annotations

import functools
import inspect
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_llmdbg import distributed, stats
from lightning_llmdbg._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_llmdbg.sampling import SampledStepCounters, SamplingSchedule
from lightning_llmdbg.selection import ModuleSpec, attention_modules, head_module, resolve_modules, validate_module_spec
from lightning_llmdbg.signals import PREFIX, SignalSource, Signals
from lightning_llmdbg.stats import FusedStatistics
from lightning_llmdbg.writers import HEALTH_CATEGORY, Writers

ACT_STATS = ("mean", "std", "rms", "absmax", "zero_frac", "dead_frac", "outliers", "channel_kurtosis", "kurtosis")


def hidden_state(output: Any) -> Tensor | None:
    """The hidden-state tensor of a module's output.

    A tensor is itself; a tuple or list gives its first tensor (HF blocks and attention modules put the hidden
    state first); a dict or HF ``ModelOutput`` gives ``last_hidden_state``, else ``hidden_states`` if that is a
    tensor, else its first tensor value. Anything else: None (the module is skipped on that call).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        return next((v for v in output.values() if isinstance(v, Tensor)), None)
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, Tensor)), None)
    return None


def attention_probabilities(output: Any) -> Tensor | None:
    """``(output, weights)`` with 4-D square-ish weights ``[B, H, Tq, Tk]``, as HF eager attention returns them."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], Tensor) and output[1].dim() == 4:
        return output[1]
    return None


def attention_logit_max(output: Any) -> Tensor | None:
    """The largest pre-softmax attention logit, from ``(output, probabilities, logit_max)`` where an attention module
    returns it (the reference GPT does); softmax probabilities alone cannot give it back."""
    if (
        attention_probabilities(output) is not None
        and len(output) > 2
        and isinstance(output[2], Tensor)
        and output[2].dim() <= 1
        and output[2].is_floating_point()
    ):
        return output[2].detach().float().amax().reshape(1)
    return None


# Attributes a sampled step's hooks set on the modules they are attached to; removed at the end of the fit.
SLOTS = {"act": "_llmdbg_act", "hist": "_llmdbg_hist", "attn": "_llmdbg_attn", "logits": "_llmdbg_logits"}
GRADIENT_SLOT = "_llmdbg_grad"  # a float64 [sum of squares, count] buffer, added to in place during backward
CAPTURE_SLOT = "_llmdbg_capture"  # the _AttentionCapture entered for the module's forward pass now running
CAPTURE_FAILURES = "capture_failures"  # the accumulator key of `_capture_failures`, reduced with the maxima


def _attention_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arguments of a ``scaled_dot_product_attention`` call that shape its weights."""
    return query, key, attn_mask, is_causal, scale, enable_gqa


_MULTI_HEAD_ATTENTION = inspect.signature(F.multi_head_attention_forward)
# At most this many weights at once when a `multi_head_attention_forward` call is repeated for them: longer queries
# go in chunks of rows (each chunk repeats the key and value projections).
_MULTI_HEAD_CHUNK_VALUES = 1 << 24
_REPEATING = threading.local()  # set while a call is repeated, so that no capture counts the repeat


def _multi_head_attention_partials(args: tuple, kwargs: dict, out: Any, statistics: FusedStatistics) -> Tensor:
    """Attention-entropy partials (:func:`~lightning_llmdbg.stats.attention_partials`) of the per-head weights of a
    ``multi_head_attention_forward`` call (``nn.MultiheadAttention``, and so PyTorch's ``nn.Transformer*`` layers),
    before dropout. The call hands itself to a function mode whole, which hides its inner
    ``scaled_dot_product_attention`` call; so unless its result ``out`` already holds per-head weights without
    dropout, the call is repeated without gradient asking for them, a chunk of query rows at a time."""
    def partials_of(weights: Tensor) -> Tensor:
        return statistics.attention(weights if weights.dim() == 4 else weights.unsqueeze(0))  # unbatched: [H, L, S]

    call = _MULTI_HEAD_ATTENTION.bind(*args, **kwargs)
    call.apply_defaults()
    arguments = call.arguments
    returned = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    no_dropout = not arguments["training"] or arguments["dropout_p"] == 0.0
    if arguments["need_weights"] and not arguments["average_attn_weights"] and returned is not None and no_dropout:
        return partials_of(returned)
    arguments.update(need_weights=True, average_attn_weights=False, training=False)
    query, mask = arguments["query"], arguments["attn_mask"]  # [L, N, E] or [L, E]; the mask [.., L, S]
    batch = query.shape[1] if query.dim() == 3 else 1
    keys = arguments["key"].shape[0] + 2  # (a learned key bias and a zero key add one each)
    rows = max(1, _MULTI_HEAD_CHUNK_VALUES // (batch * arguments["num_heads"] * keys))
    partials = None
    _REPEATING.active = True
    try:
        with torch.no_grad():
            for r0 in range(0, query.shape[0], rows):
                if rows < query.shape[0]:
                    arguments["query"] = query[r0 : r0 + rows]
                    arguments["attn_mask"] = None if mask is None else mask[..., r0 : r0 + rows, :]
                part = partials_of(F.multi_head_attention_forward(*call.args, **call.kwargs)[1])
                partials = part if partials is None else partials + part
    finally:
        _REPEATING.active = False
    return partials


class _AttentionCapture(TorchFunctionMode):
    """Entered for one forward pass of an attention module on a sampled step. Its ``scaled_dot_product_attention``
    calls run as they are; the weights each one forms are recomputed without gradient for their entropy and largest
    logit (:func:`~lightning_llmdbg.stats.scaled_dot_product_attention_partials`): the fused kernels never return
    them. Its ``multi_head_attention_forward`` calls (``nn.MultiheadAttention``) run as they are too, and give the
    entropy of their per-head weights (:func:`_multi_head_attention_partials`). Any other call passes through
    untouched."""

    def __init__(self, statistics: FusedStatistics) -> None:
        super().__init__()
        self.statistics = statistics
        self.partials: tuple | None = None
        self.error: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        captured = func in (F.scaled_dot_product_attention, F.multi_head_attention_forward)
        if captured and self.error is None and not getattr(_REPEATING, "active", False):
            try:
                if func is F.scaled_dot_product_attention:
                    partials = self.statistics.scaled_dot_product_attention(*_attention_call(*args, **kwargs))
                else:
                    partials = (_multi_head_attention_partials(args, kwargs, out, self.statistics),)
                self.partials = _merged(self.partials, *partials)
            except Exception as err:  # a statistic never stops training
                # The message only: a traceback would keep the failed call's temporaries alive until the step ends.
                self.error = f"{type(err).__name__}: {err}"
        return out

    def leave(self) -> None:
        """Leave the mode stack wherever this is on it; modes entered after it and not yet left stay, in order."""
        stack = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
        if not any(mode is self for mode in stack):
            return
        above = []
        while (mode := torch._C._pop_torch_function_stack()) is not self:
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)


def _merged(previous: tuple | None, sums: Tensor, maxes: Tensor | None = None, add: Callable = operator.add) -> tuple:
    """``(sums, maxes)`` added to ``previous`` with ``add``: one rule for a module called twice in a forward pass
    (its slot) and for a step's micro-batches (the accumulator). A call with another width is left out; the
    accumulator warns about it, a hook cannot (a warning would break a compiled graph)."""
    if previous is None:
        return (sums, maxes)
    if previous[0].shape != sums.shape:
        return previous
    return (add(previous[0], sums), previous[1] if maxes is None else torch.maximum(previous[1], maxes))


def _adder(key: str) -> Callable:
    """How partials under ``key`` add up: activation partials are sums about each part's own mean."""
    return stats.add_activation_partials if key.startswith("act/") else operator.add


def _add_gradient_partials(buffer: Tensor, grad: Tensor) -> None:
    g = grad.detach().float()
    count = torch.full((), float(g.numel()), dtype=torch.float64, device=g.device)
    buffer.add_(torch.stack([(g * g).sum(dtype=torch.float64), count]))


@dataclass
class _Accumulator:
    """On-device partial sums of one sampled step, added up over its micro-batches."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    maxes: dict[str, Tensor] = field(default_factory=dict)

    def add(self, key: str, sums: Tensor, maxes: Tensor | None = None) -> None:
        previous = (self.sums[key], self.maxes.get(key)) if key in self.sums else None
        if previous is not None and previous[0].shape != sums.shape:
            # A module called again with another width: keep the first, never stop training over it.
            rank_zero_warn(f"ActivationProbe: {key} changed width within a step ({tuple(previous[0].shape)} then {tuple(sums.shape)}); the later call is left out.")
            return
        self.sums[key], merged_maxes = _merged(previous, sums, maxes, add=_adder(key))
        if merged_maxes is not None:
            self.maxes[key] = merged_maxes


class ActivationProbe(SampledStepCounters, Callback, SignalSource):
    r"""Statistics of chosen layers' activations, measured by hooks that exist only on sampled steps.

    On a sampled optimizer step, forward hooks are attached at the start of each of its (micro-)batches and
    removed as soon as the forward pass ends (before backward, so activation checkpointing's recomputation does
    not count twice); with ``gradients=True`` a hook on each hidden-state tensor catches its gradient during
    backward and goes with the graph. Statistics are computed on the device inside the hook, as partial sums
    that add up over micro-batches and ranks; no activation is kept after a hook returns. After the optimizer
    step the partial sums are reduced across processes (one SUM and one MAX collective, after a small one that
    agrees on sizes; on a step where forming attention weights again failed on some rank, also one gather of the
    errors on every rank) and logged.

    Logged keys (``<module>``: ``block_<i>`` for ``"blocks"``, else the module name the pattern matched):

    - ``llmdbg/act/<module>/mean``, ``std``, ``rms``, ``absmax``: of all values of the hidden state.
    - ``llmdbg/act/<module>/zero_frac``: fraction of exact zeros.
    - ``llmdbg/act/<module>/dead_frac``: fraction of channels (last dimension) that never exceed zero over the
      whole batch.
    - ``llmdbg/act/<module>/outliers``: hidden dimensions with \|x\| ≥ 6 at ≥ 6% of positions (LLM.int8).
    - ``llmdbg/act/<module>/channel_kurtosis``: E[r⁴]/E[r²]² of the per-channel RMS r (1: no outlier channels).
    - ``llmdbg/act/<module>/kurtosis``: kurtosis of the values (3 for a Gaussian).
    - ``llmdbg/act_grad/<module>/rms``: RMS of the gradient with respect to the hidden state of the objective
      the optimizer sees (``gradients=True``; AMP loss scaling removed; with data parallelism, of the mean of the
      ranks' losses, as DDP and FSDP average gradients; with tensor parallelism the divisor is the whole world size
      and the value is off by the tensor-parallel degree).
    - ``llmdbg/attn/<module>/entropy_mean`` and ``entropy_min``: per-head attention entropy −Σ p log p averaged
      over query positions, then its mean and minimum over heads. From attention modules that either
      return ``(output, probabilities)`` (Hugging Face attention under ``attn_implementation="eager"``; the
      reference GPT when its ``return_attention`` attribute is set, which the probe does on sampled steps), or
      call ``torch.nn.functional.scaled_dot_product_attention`` (Hugging Face's default ``"sdpa"``, and most
      models written for PyTorch 2). Fused kernels never return their weights, so on a sampled step the probe
      catches each such call in the module's forward pass (a ``TorchFunctionMode`` entered for that pass only)
      and forms its weights again from the queries, keys, mask and scale, without gradient and a chunk of query
      rows at a time (no ``[B, H, L, S]`` tensor is ever whole). Rows whose every key a boolean or −inf mask
      hides are left out. Not where the attention module itself runs under ``torch.compile`` (such a model logs
      entropy only if its attention returns probabilities; a compiled function called inside an eager attention
      module is caught) and not for flash-attention kernels called directly. Where forming a module's weights again
      fails on any rank, its entropy stops on every rank, with a warning that quotes the error.
      ``nn.MultiheadAttention`` (PyTorch's ``nn.Transformer*`` layers) hands its whole call to the mode, which hides
      the kernel call inside; the probe repeats that call without gradient or dropout, asking for its per-head
      weights (an eager pass of the attention on sampled steps only, in chunks of query rows past 2^24 weights;
      no ``logit_max``; a query row whose every key is masked has NaN weights there, and so NaN entropy, as the
      module's own weights do). HF eager attention returns its weights after attention dropout (with
      ``attn_pdrop > 0`` they are not probabilities); weights formed again are before dropout.
    - ``llmdbg/attn/<module>/logit_max``: the largest pre-softmax attention logit (q·k/√d or the call's own
      scale, plus a float mask), for modules that call ``scaled_dot_product_attention`` themselves (not
      ``nn.MultiheadAttention``) and for those that return it as a third element ``(output, probabilities,
      logit_max)``, as the reference GPT does; probabilities alone cannot give it back.
    - ``llmdbg/logits/lse_sq`` and ``llmdbg/logits/max``: mean logsumexp² of the output logits (what z-loss
      penalises) and the largest logit, from the LM head (``lm_head``/``embed_out``/``output_layer``).
    - ``llmdbg/act_hist/<module>``: histogram of the hidden state (``histograms=True``), on fixed log-spaced
      bins so that micro-batches and ranks add up; NaN/Inf are counted, not binned.

    A ``torch.compile``d model (whole or per block) compiles once more for the sampled steps and keeps its plain
    graph on the others: the hooks are one bound method per kind, shared by all modules, and leave their partial
    sums as attributes of the module (``_llmdbg_act`` and the like, removed at the end of the fit). An empty
    batch adds nothing; a sampled step on which no module ran logs nothing. Nested tensors (PyTorch's fast path for
    ``nn.TransformerEncoder`` in eval mode with a padding mask) are left out, and their attention is not captured.

    TensorBoard gets a custom-scalars layout with one chart per statistic and all modules on it, and the RMS,
    kurtosis and lowest-head attention entropy charts in the one-page ``llmdbg: health`` category. The values are
    also published as :class:`~lightning_llmdbg.signals.Signals` to subscribers.

    Args:
        modules: ``"blocks"`` (each transformer block's output, found as GradientMonitor finds blocks), or a list
            of globs over ``named_modules()`` names and/or module types (see
            :func:`~lightning_llmdbg.selection.resolve_modules`).
        every_n_steps: sample every this many optimizer steps.
        warmup_steps: also sample every step before this one.
        stats: which of ``mean, std, rms, absmax, zero_frac, dead_frac, outliers, channel_kurtosis, kurtosis``
            to log (all are computed from the same partial sums).
        gradients: also measure the gradient with respect to each probed hidden state.
        histograms: also log activation histograms.
        attention: probe attention entropy in the attention submodules of the probed modules.
        logits: probe the LM head's logits.
        compile_statistics: compute each statistic in one or two fused loops compiled by ``torch.compile`` (a C++
            compiler on CPU, Triton on GPU) rather than eager passes, one through memory for each intermediate
            (:class:`~lightning_llmdbg.stats.FusedStatistics`). The first sampled step compiles them (seconds, once per
            process); where compiling fails, one warning and eager statistics. ``False``: eager, no compiling.

    Example::

        from pytorch_lightning import Trainer
        from lightning_llmdbg import ActivationProbe

        trainer = Trainer(callbacks=[ActivationProbe(modules="blocks", every_n_steps=100)])
    """

    signal_source_name = "activation_probe"

    def __init__(
        self,
        modules: ModuleSpec = "blocks",
        every_n_steps: int = 100,
        warmup_steps: int = 0,
        stats: Sequence[str] = ACT_STATS,
        gradients: bool = False,
        histograms: bool = False,
        attention: bool = True,
        logits: bool = True,
        compile_statistics: bool = True,
    ) -> None:
        validate_module_spec(modules)
        self.schedule = SamplingSchedule(every_n_steps=every_n_steps, warmup_steps=warmup_steps)
        unknown = [s for s in stats if s not in ACT_STATS]
        if isinstance(stats, str) or unknown or not stats:
            raise ValueError(f"`stats` must be a non-empty list drawn from {ACT_STATS}, got {stats!r}.")
        self.modules = modules
        self.stats = tuple(stats)
        self.gradients = bool(gradients)
        self.histograms = bool(histograms)
        self.attention = bool(attention)
        self.logits = bool(logits)
        self.compile_statistics = bool(compile_statistics)
        self._statistics = FusedStatistics(self.compile_statistics)
        self._warned_eager = False
        self._targets: dict[str, nn.Module] = {}
        self._attention: dict[str, nn.Module] = {}
        self._head: nn.Module | None = None
        self._handles: list[Any] = []
        self._switched: list[tuple[nn.Module, Any]] = []  # modules whose `return_attention` we set, with its old value
        # ids of attention modules not to capture: they return their weights, or their weights could not be formed again
        self._not_captured: set[int] = set()
        self._capture_errors: list[tuple[nn.Module, str]] = []
        self._capture_stopped: set[str] = set()  # attention modules whose weights could not be formed again
        self._pending_step: int | None = None
        self._acc = _Accumulator()
        self._loss_scale = 1.0
        self._device = torch.device("cpu")
        self._writers: Writers | None = None
        self._warned_no_attention = False

    # -- Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._writers = Writers.for_trainer(trainer)
        # Fail fast, naming the pattern; with `configure_model` the layers may not exist yet (resolved at fit start).
        if any(True for _ in pl_module.parameters()):
            self._resolve(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._device = trainer.strategy.root_device
        self._targets = self._resolve(pl_module)
        self._attention = attention_modules(self._targets) if self.attention else {}
        self._not_captured, self._capture_errors, self._capture_stopped = set(), [], set()
        self._head = head_module(pl_module) if self.logits else None
        if self._writers is not None:
            charts = {f"{PREFIX}/act/{s}": [rf"{PREFIX}/act/.*/{s}$"] for s in self.stats}
            if self.gradients:
                charts[f"{PREFIX}/act_grad/rms"] = [rf"{PREFIX}/act_grad/.*/rms$"]
            if self._attention:
                charts.update({f"{PREFIX}/attn/{s}": [rf"{PREFIX}/attn/.*/{s}$"] for s in ("entropy_mean", "entropy_min", "logit_max")})
            if self._head is not None:
                charts[f"{PREFIX}/logits"] = [rf"{PREFIX}/logits/.*"]
            self._writers.custom_scalars("llmdbg: activations", charts)
            health = {f"activation {s} by layer": [rf"{PREFIX}/act/.*/{s}$"] for s in ("rms", "kurtosis") if s in self.stats}
            if self._attention:
                health["attention entropy (lowest head) by layer"] = [rf"{PREFIX}/attn/.*/entropy_min$"]
            self._writers.custom_scalars(HEALTH_CATEGORY, health)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.schedule.is_sampled(step) or step == self.last_sampled_step:
            return
        if self._pending_step is not None and self._pending_step != step:
            self._acc = _Accumulator()  # a sampled step that never reached its optimizer step (skipped by AMP)
            for _, buffer in self._gradient_buffers():
                buffer.zero_()
        self._pending_step = step
        self._attach()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._handles:  # the scale this sampled backward pass runs with (it may change at the optimizer step)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self._loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
            self._detach()
            self._file_forward()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._handles:  # no backward ran (training_step returned None)
            self._detach()
            self._file_forward()
        if self._pending_step is not None and trainer.global_step > self._pending_step:
            step, self._pending_step = self._pending_step, None
            if self.gradients:
                self._file_gradients()
            self._finish(step)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()
        self._remove_slots()
        self._pending_step = None
        self._acc = _Accumulator()
        self._capture_errors = []

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        if self._writers is not None:
            self._writers.flush()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._detach()
        self._remove_slots()
        self._pending_step = None
        self._acc = _Accumulator()
        self._capture_errors = []
        self._targets, self._attention, self._head = {}, {}, None

    def _resolve(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        try:
            return resolve_modules(pl_module, self.modules)
        except ValueError as err:
            raise ValueError(f"ActivationProbe(modules={self.modules!r}): {err}") from None

    # -- hooks -------------------------------------------------------------------------------------------------
    # One bound method per kind of hook, shared by every module, that leaves its partial sums on the hooked module
    # itself (SLOTS). A closure per module, or a hook that wrote into this callback's dicts, would make a compiled
    # model specialise per module (one recompilation each) and break its graph; with this, a `torch.compile`d
    # model compiles once for sampled steps and keeps its plain graph on the others.
    def _attach(self) -> None:
        self._detach()
        self._reset_slots()
        for module in self._targets.values():
            self._handles.append(module.register_forward_hook(self._on_activation))
        for module in self._attention.values():
            switchable = hasattr(module, "return_attention")
            if switchable:
                self._switched.append((module, module.return_attention))
                module.return_attention = True
            # Otherwise its `scaled_dot_product_attention` calls are caught: the pre-hook comes first and the hook
            # (`always_call`, so that the mode is left on an error) last, so that another hook pair's mode nests inside.
            captured = not switchable and id(module) not in self._not_captured
            if captured:
                self._handles.append(module.register_forward_pre_hook(self._on_attention_start, prepend=True))
            self._handles.append(module.register_forward_hook(self._on_attention, always_call=captured))
        if self._head is not None:
            self._handles.append(self._head.register_forward_hook(self._on_logits))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._attention.values():  # a forward pass interrupted (KeyboardInterrupt) inside the module
            for capture in reversed(module.__dict__.pop(CAPTURE_SLOT, None) or []):
                capture.leave()
        for module, before in self._switched:
            module.return_attention = before
        self._switched = []

    def _probed(self) -> list[tuple[str, str, nn.Module]]:
        """``(accumulator key, slot, module)`` for every slot a hook may fill."""
        probed = [(f"act/{k}", SLOTS["act"], m) for k, m in self._targets.items()]
        probed += [(f"hist/{k}", SLOTS["hist"], m) for k, m in self._targets.items()] if self.histograms else []
        probed += [(f"attn/{k}", SLOTS["attn"], m) for k, m in self._attention.items()]
        probed += [("logits", SLOTS["logits"], self._head)] if self._head is not None else []
        return probed

    def _reset_slots(self) -> None:
        for _, slot, module in self._probed():
            setattr(module, slot, None)
        if self.gradients:
            for module in self._targets.values():
                if getattr(module, GRADIENT_SLOT, None) is None:
                    # On the module's own device: a model may span devices within one process (`device_map`).
                    device = next(module.parameters(), torch.empty(0, device=self._device)).device
                    setattr(module, GRADIENT_SLOT, torch.zeros(2, dtype=torch.float64, device=device))

    def _file_forward(self) -> None:
        """Move what the forward hooks left on the modules into this step's accumulator."""
        for key, slot, module in self._probed():
            value = getattr(module, slot, None)
            if value is not None:
                self._acc.add(key, *value)
                setattr(module, slot, None)

    def _file_gradients(self) -> None:
        # Every buffer, without looking at its count (that would be a host sync per module): a module whose
        # gradient hook never ran adds a zero count, and `_finish` leaves it out.
        for key, buffer in self._gradient_buffers():
            self._acc.add(f"grad/{key}", buffer.clone())
            buffer.zero_()

    def _gradient_buffers(self) -> list[tuple[str, Tensor]]:
        buffers = [(key, getattr(module, GRADIENT_SLOT, None)) for key, module in self._targets.items()]
        return [(key, buffer) for key, buffer in buffers if buffer is not None]

    def _remove_slots(self) -> None:
        modules = [m for _, _, m in self._probed()] + list(self._targets.values())
        for module in modules:
            for slot in (*SLOTS.values(), GRADIENT_SLOT):
                if slot in module.__dict__:
                    delattr(module, slot)

    def _on_activation(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = hidden_state(output)
        if hidden is None or hidden.is_nested:
            return
        if hidden.dim() == 0 or hidden.numel() == 0 or not hidden.is_floating_point():
            return  # an empty batch contributes nothing (the other ranks' statistics still reduce)
        module._llmdbg_act = _merged(module._llmdbg_act, *self._statistics.activation(hidden), add=stats.add_activation_partials)
        if self.histograms:
            module._llmdbg_hist = _merged(module._llmdbg_hist, stats.fixed_histogram_partials(hidden))
        if self.gradients and hidden.requires_grad:
            hidden.register_hook(functools.partial(_add_gradient_partials, module._llmdbg_grad))

    def _on_attention_start(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return  # a compiled graph cannot enter a mode here; such models return their weights or log none
        if any(isinstance(a, Tensor) and a.is_nested for a in args):
            # Nested tensors reach nn.MultiheadAttention only on its fast path, which an active mode turns off.
            return
        capture = _AttentionCapture(self._statistics)
        capture.__enter__()
        module.__dict__.setdefault(CAPTURE_SLOT, []).append(capture)

    def _on_attention(self, module: nn.Module, args: Any, output: Any) -> None:
        capture = None
        if not torch.compiler.is_compiling() and module.__dict__.get(CAPTURE_SLOT):
            capture = module.__dict__[CAPTURE_SLOT].pop()
            capture.leave()
            if output is None:
                return  # the forward pass raised (an `always_call` hook still runs): nothing to file
        probs = attention_probabilities(output)
        if probs is not None and probs.numel() > 0:
            module._llmdbg_attn = _merged(module._llmdbg_attn, self._statistics.attention(probs), attention_logit_max(output))
            if capture is not None:
                self._not_captured.add(id(module))
        elif capture is not None and capture.partials is not None:
            module._llmdbg_attn = _merged(module._llmdbg_attn, *capture.partials)
        if capture is not None and capture.error is not None:
            self._capture_errors.append((module, capture.error))

    def _on_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = hidden_state(output)
        if logits is not None and not logits.is_nested and logits.numel() > 0 and logits.is_floating_point():
            module._llmdbg_logits = _merged(module._llmdbg_logits, *self._statistics.logits(logits))

    def _capture_failures(self) -> Tensor:
        """Per attention module, 1 if forming its weights again failed on this rank at this step, else 0. Reduced with
        the maxima, so that every rank learns which modules failed on any rank."""
        failed = {id(module) for module, _ in self._capture_errors}
        flags = [float(id(module) in failed) for module in self._attention.values()]
        return torch.tensor(flags, dtype=torch.float32, device=self._device)

    def _stop_capturing(self, failures: Tensor | None) -> set[str]:
        """Stop capturing, on every rank, the attention modules whose weights could not be formed again on some rank
        at this step: one warning per module, quoting each failing rank's error. Returns their names.

        ``failures`` is the same on every rank (a MAX reduction): every rank gathers the errors, or none does.
        """
        errors, self._capture_errors = self._capture_errors, []
        failed = set() if failures is None else {n for n, flag in zip(self._attention, failures.tolist()) if flag > 0}
        if not failed:
            return failed
        names = {id(module): name for name, module in self._attention.items()}
        rank = torch.distributed.get_rank() if distributed.is_distributed() else None
        # Once per module and error: with gradient accumulation a module fails again on each micro-batch.
        mine = list(dict.fromkeys((names[id(module)], rank, error) for module, error in errors if id(module) in names))
        reported = [entry for per_rank in distributed.all_gather_objects(mine) for entry in per_rank]
        for name in sorted(failed - self._capture_stopped):
            self._capture_stopped.add(name)
            self._not_captured.add(id(self._attention[name]))
            where = "; ".join(error if r is None else f"rank {r}: {error}" for n, r, error in reported if n == name)
            rank_zero_warn(
                f"ActivationProbe: the attention weights of {name!r} could not be recomputed from its attention call "
                f"({where}); its attention entropy is no longer logged, on any rank. "
                "Training goes on."
            )
        return failed

    # -- reduction and output ----------------------------------------------------------------------------------
    def _expected_keys(self) -> list[str]:
        keys = [f"act/{k}" for k in self._targets]
        keys += [f"hist/{k}" for k in self._targets] if self.histograms else []
        keys += [f"grad/{k}" for k in self._targets] if self.gradients else []
        keys += [f"attn/{k}" for k in self._attention]
        keys += ["logits"] if self._head is not None else []
        keys += [CAPTURE_FAILURES] if self._attention else []
        return keys

    def _finish(self, step: int) -> None:
        acc, self._acc = self._acc, _Accumulator()
        keys = self._expected_keys()
        if distributed.is_distributed():  # ranks' activation partials are about their own means: to shift 0
            acc.sums = {k: stats.activation_partials_about_zero(v) if k.startswith("act/") else v for k, v in acc.sums.items()}
        if self._attention:
            acc.maxes[CAPTURE_FAILURES] = self._capture_failures()
        sums, maxes = distributed.reduce_partials(acc.sums, acc.maxes, keys, self._device)
        # A module that failed on one rank has the other ranks' weights only: not the global statistic, left out.
        failed_attention = self._stop_capturing(maxes.pop(CAPTURE_FAILURES, None))
        values: dict[str, float] = {}
        histograms = {}
        for key in keys:
            kind, _, name = key.partition("/")
            partial = sums.get(key)
            if partial is None:
                continue
            if kind == "act":
                computed = stats.activation_stats(partial, maxes[key])
                values.update({f"{PREFIX}/act/{name}/{s}": computed[s] for s in self.stats})
            elif kind == "grad":
                total, count = partial.tolist()
                if count == 0:  # its gradient hook never ran (no backward through it)
                    continue
                # Data-parallel ranks average their gradients, so the objective is the mean of the ranks' losses.
                world = torch.distributed.get_world_size() if distributed.is_distributed() else 1
                values[f"{PREFIX}/act_grad/{name}/rms"] = (total / count) ** 0.5 / self._loss_scale / world
            elif kind == "attn" and name not in failed_attention:
                values.update({f"{PREFIX}/attn/{name}/{s}": v for s, v in stats.attention_stats(partial).items()})
                if key in maxes:
                    values[f"{PREFIX}/attn/{name}/logit_max"] = float(maxes[key][0])
            elif kind == "logits":
                lse_sq, positions = partial.tolist()
                values[f"{PREFIX}/logits/lse_sq"] = lse_sq / positions
                values[f"{PREFIX}/logits/max"] = float(maxes[key][0])
            elif kind == "hist":
                histograms[name] = stats.fixed_histogram(partial)
        self._count_sample(step)
        if self._statistics.failure is not None and not self._warned_eager:
            self._warned_eager = True
            rank_zero_warn(
                f"ActivationProbe: torch.compile could not compile its statistics ({self._statistics.failure}); they "
                "run eager from now on, which costs more on each sampled step. Pass compile_statistics=False to skip "
                "the attempt."
            )
        if not any(k.startswith(("act/", "attn/", "logits")) for k in sums):
            return  # nothing ran forward on any rank (an empty or skipped batch): no statistic to report
        # Modules whose capture failed were warned about; the warning is for the others.
        silent = set(self._attention) - self._capture_stopped
        no_attention = silent and not any(k.startswith("attn/") for k in sums)
        if no_attention and not self._warned_no_attention:
            self._warned_no_attention = True
            rank_zero_warn(
                "ActivationProbe: the attention modules neither returned their attention probabilities nor called "
                "torch.nn.functional.scaled_dot_product_attention outside torch.compile, so no attention entropy is "
                "logged. Hugging Face models log it with attn_implementation='sdpa' (the default) or 'eager', not with "
                "flash-attention kernels; a compiled model logs it only if its attention returns probabilities."
            )
        self._publish(Signals(source=self.signal_source_name, step=step, values=values))
        if self._writers is not None:
            self._writers.scalars(values, step)
            for name, hist in histograms.items():
                self._writers.histogram(f"{PREFIX}/act_hist/{name}", hist, step)
