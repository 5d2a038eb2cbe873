"""Step-time overhead of the debugger and its alternatives against a plain Trainer on the reference GPT.

Interleaved in one run: one Trainer (TensorBoard and offline W&B loggers) trains the reference GPT, and every
``--block`` optimizer steps the active arm changes; a plain block (no debugging callback) stands between every two
measured blocks, and the measured arms come in a shuffled order per cycle:

   - GradientMonitor at defaults, and at every step;
   - Lightning's ``grad_norm`` recipe (``self.log_dict(grad_norm(self, 2))``) every step;
   - ``WandbLogger.watch(model, log="all", log_freq=1)`` (``unwatch`` outside its blocks);
   - ActivationProbe at defaults, and on every block at every step;
   - a Composer-style activation monitor (hooks on every module, four statistics each read to the host) every step;
   - a lightning-bolts ``ModuleDataMonitor``-style histogram of each block's output copied to the CPU every step.

An arm's callback runs only in its own blocks, so all arms share the process, the data, the allocator and the
machine. A step's time is the wall time between consecutive batch starts (everything a step costs, logging
included). A measured block's overhead is its mean step time over the mean of the two plain blocks beside it
(which cancels the machine's slow drift); an arm's overhead is the mean over its blocks, with a 95% bootstrap
interval. Blocks hold a whole number of each default arm's sampling interval (25 steps; 100 steps, in a second fit, for
ActivationProbe at defaults); each arm's first block is its warm-up (ActivationProbe compiles its statistics on its
first sampled step) and is left out, its ratio printed apart.

Also measured in place, at the hook, on the same gradients: the cost of one GradientMonitor sampled step
(measurement, and writing) and the floor, one bare ``torch._foreach_norm`` pass over all gradients with its
result moved to the host.

    python benchmarks/overhead.py                               # the numbers in BENCHMARKS.md
    python benchmarks/overhead.py --cycles 2 --slow-cycles 2 --batch-size 4   # a quick look
    python benchmarks/overhead.py --arms activation_probe_every_block_every_step --width 384   # a wider model
    python benchmarks/overhead.py --hf-gpt2 --arms activation_probe_every_block_every_step,hf_gpt2_eager_attention_only

Arms named only with ``--arms`` take the every-step probe apart (``ABLATION_ARMS``): without attention, without
attention and logits, the reference GPT returning its attention weights alone, and the probe with the reference GPT's
eager switch hidden so that its entropy comes from weights formed again (``activation_probe_every_step_fused_attention``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from pytorch_lightning.utilities import grad_norm  # noqa: E402

from lightning_llmdbg import ActivationProbe, AnomalyAlert, GradientMonitor, HardExampleLogger, LLMDebugger  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402

STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")


class StepTimes(pl.Callback):
    """Wall time between consecutive batch starts, by the step that started it."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}

    def on_train_batch_start(self, trainer, *args) -> None:
        self.starts[trainer.global_step] = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.starts[trainer.global_step] = time.perf_counter()

    def durations(self) -> dict[int, float]:
        return {s: self.starts[s + 1] - t for s, t in self.starts.items() if s + 1 in self.starts}


class ArmSchedule:
    """Which arm runs at a step: blocks of ``block`` steps, a plain block before every measured block
    (P X₁ P X₂ … P), the measured arms shuffled within each cycle."""

    def __init__(self, arms: list[str], block: int, cycles: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.block = block
        self.active: str | None = None
        self.blocks = [b for _ in range(cycles) for arm in rng.sample(arms, len(arms)) for b in ("plain", arm)]
        self.blocks.append("plain")

    @property
    def steps(self) -> int:
        return self.block * len(self.blocks)

    def arm_at(self, step: int) -> str:
        return self.blocks[min(step // self.block, len(self.blocks) - 1)]


class OnlyInArm(pl.Callback):
    """Runs ``inner``'s per-step hooks only in ``arm``'s blocks; setup and teardown hooks always."""

    def __init__(self, inner: pl.Callback, arm: str, schedule: ArmSchedule) -> None:
        self.inner, self.arm, self.schedule = inner, arm, schedule

    @property
    def state_key(self) -> str:
        return f"OnlyInArm[{self.arm}]"

    @property
    def callbacks(self) -> list:  # so that AnomalyAlert finds the measuring callbacks inside (signal_sources)
        return [self.inner]

    def __getattribute__(self, name):
        if name in STEP_HOOKS:
            inner = object.__getattribute__(self, "inner")
            schedule, arm = object.__getattribute__(self, "schedule"), object.__getattribute__(self, "arm")

            def hook(trainer, *args, **kwargs):
                # The arm is fixed at batch start: `global_step` moves on inside the batch.
                if name == "on_train_batch_start":
                    schedule.active = schedule.arm_at(trainer.global_step)
                if schedule.active == arm:
                    getattr(inner, name)(trainer, *args, **kwargs)

            return hook
        if name in ("setup", "on_fit_start", "on_fit_end", "teardown", "state_dict", "load_state_dict"):
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)


class LightningGradNorm(pl.Callback):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class ComposerStyleEveryModule(pl.Callback):
    """What Composer's ActivationMonitor does on a logging step, here on every step: forward hooks on every module,
    each computing l2 norm, mean, max and kurtosis of its output and reading them to the host."""

    def __init__(self) -> None:
        self.handles: list = []
        self.metrics: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        for name, module in pl_module.named_modules():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            x = out.detach().float()
            mean, std = x.mean(), x.std()
            self.metrics[f"activations/l2_norm/{name}"] = torch.linalg.vector_norm(x).item()
            self.metrics[f"activations/average/{name}"] = mean.item()
            self.metrics[f"activations/max/{name}"] = x.max().item()
            self.metrics[f"activations/kurtosis/{name}"] = (((x - mean) / std) ** 4).mean().item()

        return hook

    def on_before_backward(self, *args) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def on_train_batch_end(self, trainer, *args) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
        self.metrics = {}


class HistogramCopyToCpu(pl.Callback):
    """What lightning-bolts' ModuleDataMonitor does, on the transformer blocks and every step: each block's output
    copied to the CPU and handed to ``SummaryWriter.add_histogram``."""

    def __init__(self) -> None:
        self.handles: list = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        writer = trainer.logger.experiment
        for i, block in enumerate(pl_module.model.transformer.h):
            self.handles.append(block.register_forward_hook(self._hook(writer, f"block_{i}", trainer.global_step)))

    @staticmethod
    def _hook(writer, name: str, step: int):
        def hook(module, args, output):
            writer.add_histogram(f"output/{name}", output.detach().cpu(), global_step=step)

        return hook

    def on_before_backward(self, *args) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class WandbWatchAll(pl.Callback):
    """``WandbLogger.watch(model, log="all", log_freq=1)`` while its arm is active, ``unwatch`` outside it."""

    def __init__(self) -> None:
        self.watching = False

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if not self.watching:
            next(lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger").watch(pl_module, log="all", log_freq=1)
            self.watching = True

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        # Unwatch at the last step of the arm's block (the arm is fixed for the batch by OnlyInArm).
        schedule = self.schedule
        if schedule.arm_at(trainer.global_step) != "wandb_watch_all":
            next(lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger").experiment.unwatch(pl_module)
            for module in pl_module.modules():  # wandb leaves this flag behind (a TODO in wandb_watch.py)
                module._wandb_watch_called = False
            self.watching = False


class TimedGradientMonitor(GradientMonitor):
    """Times each sampled step's measurement (device work and the one host transfer) and its writing, and beside
    them the floor on the same gradients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timings: dict[str, list[float]] = {"floor": [], "measure": [], "write": []}

    def _timed(self, what: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.timings[what].append((time.perf_counter() - start) * 1e3)
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._timed("floor", lambda: torch.stack(torch._foreach_norm(grads)).cpu())
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _measure(self, plan, without):
        return self._timed("measure", super()._measure, plan, without)

    def _emit(self, step, values, details, **kwargs):
        return self._timed("write", lambda: super(TimedGradientMonitor, self)._emit(step, values, details, **kwargs))


def make_trainer(steps: int, loggers: list, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def model_and_data(steps: int, batch_size: int, width: int | None = None, hf: bool = False) -> tuple[pl.LightningModule, PydocDataModule]:
    """The reference GPT, or (``hf``) Hugging Face's GPT2LMHeadModel of the same shape under SDPA attention."""
    pl.seed_everything(0, verbose=False)
    config = GPTConfig() if width is None else GPTConfig(n_embd=width, n_head=width // 32)
    if hf:
        import importlib.util

        spec = importlib.util.spec_from_file_location("hf_gpt2", Path(__file__).resolve().parents[1] / "examples" / "hf_gpt2.py")
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        model = example.GPT2Bytes(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, block_size=config.block_size)
    else:
        model = TinyGPTModule(config)
    return model, PydocDataModule(block_size=config.block_size, batch_size=batch_size, train_samples=steps * batch_size)


def run_arms(arms: dict[str, pl.Callback], args: argparse.Namespace, block: int, cycles: int, log_root: str) -> dict:
    """One fit with the arms interleaved; each measured block against the mean of the plain blocks beside it."""
    # Each default arm's block holds a whole number of its sampling interval.
    for arm, cb in arms.items():
        if hasattr(cb, "schedule") and block % cb.schedule.every_n_steps:
            raise ValueError(f"--block {block} is not a multiple of {arm}'s every_n_steps ({cb.schedule.every_n_steps}).")
    schedule = ArmSchedule(list(arms), block, cycles)
    for cb in arms.values():
        cb.schedule = getattr(cb, "schedule", schedule)
    timer = StepTimes()
    callbacks = [OnlyInArm(cb, arm, schedule) for arm, cb in arms.items()] + [timer]
    model, data = model_and_data(schedule.steps, args.batch_size, args.width, args.hf_gpt2)
    loggers = [TensorBoardLogger(log_root, name="arms")]
    if any(isinstance(cb, WandbWatchAll) for cb in arms.values()):
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=log_root, offline=True, project="llmdbg-bench"))
    make_trainer(schedule.steps, loggers, callbacks).fit(model, data)
    if len(loggers) > 1:
        import wandb

        wandb.finish()

    durations = timer.durations()
    means = [statistics.fmean(durations[s] for s in range(i * block, (i + 1) * block)) for i in range(len(schedule.blocks))]
    ratios: dict[str, list[float]] = {arm: [] for arm in arms}
    # Each arm's first block is its warm-up, left out: it holds what an arm pays once per process (ActivationProbe
    # compiles its statistics on its first sampled step; reported apart as `first_block_ratio`), and block 1, the
    # first measured one, runs while the process itself is still warming up. (GradientMonitor's own warm-up steps
    # fall in the plain block 0, where no arm runs.)
    first_block: dict[str, float] = {}
    for i in range(1, len(schedule.blocks) - 1, 2):
        ratio = means[i] / ((means[i - 1] + means[i + 1]) / 2)
        if schedule.blocks[i] in first_block:
            ratios[schedule.blocks[i]].append(ratio)
        else:
            first_block[schedule.blocks[i]] = ratio
    rng = random.Random(1)
    results = {}
    for arm, values in ratios.items():
        blocks, values = len(values), values or [float("nan")]  # one cycle: the warm-up block only
        boot = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(2000))
        results[arm] = {"ratio": statistics.fmean(values), "ci95": (boot[49], boot[1949]), "blocks": blocks, "first_block_ratio": first_block.get(arm)}
    plain_ms = statistics.median(d for s, d in durations.items() if schedule.arm_at(s) == "plain") * 1e3
    return {"plain_step_ms": plain_ms, "steps": schedule.steps, "block": block, "arms": results}


EVERY_STEP_ARMS = {  # blocks of 25 steps
    "gradient_monitor_default": lambda: GradientMonitor(),
    "gradient_monitor_every_step": lambda: GradientMonitor(every_n_steps=1),
    "anomaly_alert_with_gradient_monitor_default": lambda: LLMDebugger(
        gradients=GradientMonitor(), activations=False, examples=False, alerts=AnomalyAlert(), progress_bar=False
    ),
    "lightning_grad_norm_every_step": lambda: LightningGradNorm(),
    "wandb_watch_all": lambda: WandbWatchAll(),
    "activation_probe_every_block_every_step": lambda: ActivationProbe(every_n_steps=1),
    "composer_style_every_module_every_step": lambda: ComposerStyleEveryModule(),
    "histogram_copy_to_cpu_every_block_every_step": lambda: HistogramCopyToCpu(),
}
class ReturnAttentionOnly(pl.Callback):
    """The reference GPT computing its attention probabilities (as on a probed step) with no hook and no statistic."""

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        for block in pl_module.model.transformer.h:
            block.attn.return_attention = True

    def on_before_backward(self, trainer, pl_module, *args) -> None:
        for block in pl_module.model.transformer.h:
            block.attn.return_attention = False


class ActivationProbeKeepingFusedAttention(ActivationProbe):
    """ActivationProbe on every step with the reference GPT's ``return_attention`` switch hidden, so that its
    attention keeps the fused kernel and the entropy comes from the weights formed again (as for Hugging Face SDPA)."""

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        for block in pl_module.model.transformer.h:
            block.attn.__dict__.pop("return_attention", None)
        super().on_train_batch_start(trainer, pl_module, *args)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        for block in pl_module.model.transformer.h:
            block.attn.return_attention = False


class HuggingFaceEagerAttention(pl.Callback):
    """``--hf-gpt2`` only: the model under eager attention, what loading it with ``attn_implementation="eager"`` (so
    that its attention modules return their weights) costs on every step, with no hook and no statistic."""

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        pl_module.model.config._attn_implementation = "eager"

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        pl_module.model.config._attn_implementation = "sdpa"


ABLATION_ARMS = {  # blocks of 25 steps; only with --arms: where ActivationProbe's every-step cost goes
    "activation_probe_every_step_no_attention": lambda: ActivationProbe(every_n_steps=1, attention=False),
    "activation_probe_every_step_no_attention_no_logits": lambda: ActivationProbe(every_n_steps=1, attention=False, logits=False),
    "reference_gpt_returning_attention_only": lambda: ReturnAttentionOnly(),
    "activation_probe_every_step_fused_attention": lambda: ActivationProbeKeepingFusedAttention(every_n_steps=1),
    "hf_gpt2_eager_attention_only": lambda: HuggingFaceEagerAttention(),
}
SLOW_INTERVAL_ARMS = {  # blocks of 100 steps: ActivationProbe samples every 100 steps by default
    "activation_probe_default": lambda: ActivationProbe(),
    "hard_example_logger_default": lambda: HardExampleLogger(),
    "llm_debugger_default": lambda: LLMDebugger(progress_bar=False),
}


def run_sampled_step_cost(args: argparse.Namespace, log_root: str) -> dict:
    out = {}
    for name, kwargs in {"defaults": {}, "grad_norm_only": {"absmax": False, "param_norm": False}}.items():
        monitor = TimedGradientMonitor(every_n_steps=1, **kwargs)
        model, data = model_and_data(60, args.batch_size, args.width, args.hf_gpt2)
        make_trainer(60, [TensorBoardLogger(log_root, name=f"timed_{name}")], [monitor]).fit(model, data)
        out[name] = {what: statistics.median(ms[10:]) for what, ms in monitor.timings.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=8, help="cycles of the every-step arms (default: %(default)s)")
    parser.add_argument("--slow-cycles", type=int, default=6, help="cycles of the 100-step arms (default: %(default)s)")
    parser.add_argument("--block", type=int, default=25, help="steps per block (a multiple of 25)")
    parser.add_argument("--batch-size", type=int, default=16, help="the demo's batch (default: %(default)s)")
    parser.add_argument("--width", type=int, help="the reference GPT's n_embd, heads of 32 (default: the reference GPT, 192)")
    parser.add_argument("--hf-gpt2", action="store_true", help="Hugging Face's GPT2LMHeadModel of the same shape, SDPA attention")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--arms", help="comma-separated arm names to run (default: all); 'sampled_step_cost' for the in-place timing")
    args = parser.parse_args()
    known = [*EVERY_STEP_ARMS, *ABLATION_ARMS, *SLOW_INTERVAL_ARMS, "sampled_step_cost"]
    chosen = [k for k in known if k not in ABLATION_ARMS] if not args.arms else args.arms.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {known}")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    with tempfile.TemporaryDirectory() as log_root:
        empty = {"plain_step_ms": float("nan"), "block": 0, "arms": {}}
        fast_arms = {k: make() for k, make in {**EVERY_STEP_ARMS, **ABLATION_ARMS}.items() if k in chosen}
        slow_arms = {k: make() for k, make in SLOW_INTERVAL_ARMS.items() if k in chosen}
        arms = run_arms(fast_arms, args, args.block, args.cycles, log_root) if fast_arms else empty
        slow = run_arms(slow_arms, args, 100, args.slow_cycles, log_root) if slow_arms else empty
        print(json.dumps({"arms": {**arms["arms"], **slow["arms"]}}, indent=2), flush=True)  # kept if what follows fails
        cost = run_sampled_step_cost(args, log_root) if "sampled_step_cost" in chosen else {}

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "command": "python " + " ".join(sys.argv),
        "plain_step_ms": arms["plain_step_ms"] if fast_arms else slow["plain_step_ms"],
        "arms": {**arms["arms"], **slow["arms"]},
        "blocks": {**{k: arms["block"] for k in arms["arms"]}, **{k: slow["block"] for k in slow["arms"]}},
        "sampled_step_cost_ms": cost,
    }
    print(json.dumps(results, indent=2))
    size = "1.9M parameters" if args.width is None else f"width {args.width}"
    model = "Hugging Face GPT-2 of the reference GPT's shape, SDPA attention" if args.hf_gpt2 else f"reference GPT ({size})"
    print(f"\n{results['machine']}; {model}, batch {args.batch_size}x128 bytes; plain step {results['plain_step_ms']:.1f} ms\n")
    print("| configuration | step time / plain Trainer | 95% interval | its first block (warm-up, left out) |\n|---|---|---|---|")
    for arm, r in results["arms"].items():
        first = "" if r["first_block_ratio"] is None else f"{r['first_block_ratio']:.4f}"
        print(f"| {arm} ({r['blocks']} blocks of {results['blocks'][arm]} steps) | {r['ratio']:.4f} | {r['ci95'][0]:.4f} – {r['ci95'][1]:.4f} | {first} |")
    if cost:
        print_sampled_step_cost(cost)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_sampled_step_cost(cost: dict) -> None:
    print("\n| GradientMonitor sampled step | measure (ms) | write (ms) | floor (ms) | measure / floor | (measure + write) / floor |")
    print("|---|---|---|---|---|---|")
    for name, c in cost.items():
        print(
            f"| {name} | {c['measure']:.3f} | {c['write']:.3f} | {c['floor']:.3f} | {c['measure'] / c['floor']:.2f} | "
            f"{(c['measure'] + c['write']) / c['floor']:.2f} |"
        )


if __name__ == "__main__":
    main()
