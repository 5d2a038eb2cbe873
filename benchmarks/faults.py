"""Injected faults on the reference GPT: does AnomalyAlert name the right rule and group, how fast, and does it stay
quiet on clean runs? Beside it, on the same recorded traces, what Lightning's ``SpikeDetection`` (defaults) and
SageMaker Debugger's built-in rules (default thresholds) would have flagged.

Each fault is injected at a random step (seeded) between ``--first`` and ``--last``, after every rule's warm-up,
in runs with GradientMonitor and ActivationProbe at their defaults and ``AnomalyAlert()`` at its defaults (action
"warn"); 3 seeds per fault. A fault is detected when the right rule names the right group within one sampled interval
(GradientMonitor's ``every_n_steps``, 25) of the injection; latency is the first such alert's step minus the
injection step. Clean runs of ``--clean-steps`` steps count false alarms.

Faults:
    nan_grad      NaN in one entry of one (random) block parameter's gradient, at one step  -> nonfinite, that block
    inf_loss      the loss multiplied by Inf at one step                                     -> nonfinite, loss
    lr_spike      learning rate x100 for one step                                            -> spike / jump, any group
    weights_x50   one (random) block's weights scaled x50 at one step                        -> any rule naming that block
    random_batch  a batch of random tokens with shuffled targets                            -> spike, loss
    zero_grads    one (random) block's gradients zeroed at every step from then on           -> vanishing_gradient, that block

Comparators, on each run's recorded per-step trace (loss, per-tensor gradients and weight updates):
    Lightning SpikeDetection defaults (lightning_fabric/utilities/spike.py): mode="min", window=10, warmup=1,
        atol=None, rtol=2.0, finite_only=True: flags a non-finite loss, or a loss above the last one and at least
        2x the running mean of the last 10 non-spike losses above that mean.
    SageMaker Debugger built-in rules, default thresholds, evaluated at every step:
        vanishing_gradient  mean |g| of a gradient tensor below 1e-7;
        exploding_tensor    NaN or Inf in a gradient or the loss (only_nan=False);
        weight_update_ratio |W_t - W_t-1| / |W_t-1| of a weight tensor above 10 or below 1e-8 (eps 1e-9);
        loss_not_decreasing every 10 steps, the loss not below the loss 10 steps earlier (num_steps=10,
                            diff_percent=0).
    They name no group; a comparator "detects" a fault when it flags any step within the same interval
    (SageMaker: by a rule other than loss_not_decreasing, which flags almost half of its checks on clean runs;
    its count on the clean runs is reported separately).

    python benchmarks/faults.py             # the table in BENCHMARKS.md (3-5 minutes, one torch thread)
    python benchmarks/faults.py --quick     # one seed per fault, one short clean run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_llmdbg import ActivationProbe, AnomalyAlert, GradientMonitor  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402

CONFIG = GPTConfig(vocab_size=256, block_size=32, n_layer=3, n_head=4, n_embd=32)
BATCH = 16
INTERVAL = 25  # GradientMonitor's default every_n_steps: "within one sampled interval"
FAULTS = ("nan_grad", "inf_loss", "lr_spike", "weights_x50", "random_batch", "zero_grads")


class FaultyGPT(TinyGPTModule):
    """The reference GPT whose loss can be made Inf at one step."""

    inf_loss_step = -1

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.inf_loss_step:
            out["loss"] = out["loss"] * float("inf")
        return out


class Fault(pl.Callback):
    """Injects one fault at ``step`` (listed first, so that the debugger and the recorder see it)."""

    def __init__(self, kind: str, step: int, block: int, seed: int) -> None:
        self.kind, self.step, self.block, self.seed = kind, step, block, seed
        self.param_name = ""
        self._lr: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if self.kind == "lr_spike" and step in (self.step, self.step + 1):
            groups = trainer.optimizers[0].param_groups
            if step == self.step:
                self._lr = [g["lr"] for g in groups]
                for g in groups:
                    g["lr"] *= 100
            else:
                for g, lr in zip(groups, self._lr):
                    g["lr"] = lr
        elif self.kind == "weights_x50" and step == self.step:
            with torch.no_grad():
                for p in pl_module.model.transformer.h[self.block].parameters():
                    p.mul_(50)
        elif self.kind == "random_batch" and step == self.step:
            g = torch.Generator().manual_seed(self.seed)
            ids = batch["input_ids"]
            ids.copy_(torch.randint(0, 256, ids.shape, generator=g))
            batch["labels"].copy_(ids.flatten()[torch.randperm(ids.numel(), generator=g)].view_as(ids))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        block = pl_module.model.transformer.h[self.block]
        if self.kind == "nan_grad" and step == self.step:
            named = list(block.named_parameters())
            name, p = named[random.Random(self.seed).randrange(len(named))]
            self.param_name = name
            p.grad.view(-1)[0] = float("nan")
        elif self.kind == "zero_grads" and step >= self.step:
            for p in block.parameters():
                p.grad.zero_()


class StopAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.step:
            trainer.should_stop = True


class Trace(pl.Callback):
    """Per step: the loss, and what the SageMaker rules read (per-tensor gradients and weight updates)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.min_mean_abs_grad: dict[int, float] = {}
        self.nonfinite: dict[int, bool] = {}
        self.update_ratio: dict[int, tuple[float, float]] = {}
        self._before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        means = torch.stack([g.abs().mean() for g in grads])
        self.nonfinite[step] = not bool(torch.isfinite(means).all())
        finite = means[torch.isfinite(means)]
        self.min_mean_abs_grad[step] = float(finite.min()) if finite.numel() else float("nan")
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.loss[step] = float(outputs["loss"])
        if self._before:
            ratios = [float((p.detach() - b).norm() / (b.norm() + 1e-9)) for p, b in zip(pl_module.parameters(), self._before)]
            finite = [r for r in ratios if math.isfinite(r)]
            self.update_ratio[step] = (max(finite, default=float("nan")), min(finite, default=float("nan")))
            self._before = []


def spike_detection_flags(losses: dict[int, float]) -> list[int]:
    """Lightning's SpikeDetection at its defaults, replayed on a loss trace (it would raise at the first flag; here
    it goes on, without adding flagged values to its running mean, as it does)."""
    window, warmup, rtol = 10, 1, 2.0
    recent: list[float] = []
    last = 0.0
    flags = []
    for batch_idx, step in enumerate(sorted(losses)):
        loss = losses[step]
        mean = sum(recent) / len(recent) if recent else float("nan")
        if batch_idx >= warmup:
            if not math.isfinite(loss):
                flags.append(step)
                continue
            if loss - last > 0 and abs(loss - mean) >= abs(rtol * mean):  # not an improvement, and 3x the mean
                flags.append(step)
                continue
        if math.isfinite(loss):
            recent = (recent + [loss])[-window:]
            last = loss
    return flags


def sagemaker_flags(trace: Trace) -> dict[str, list[int]]:
    steps = sorted(trace.loss)
    flags: dict[str, list[int]] = defaultdict(list)
    for step in steps:
        if trace.min_mean_abs_grad.get(step, 1.0) < 1e-7:
            flags["vanishing_gradient"].append(step)
        if trace.nonfinite.get(step) or not math.isfinite(trace.loss[step]):
            flags["exploding_tensor"].append(step)
        high, low = trace.update_ratio.get(step, (0.5, 0.5))
        if high > 10 or low < 1e-8:
            flags["weight_update_ratio"].append(step)
        if step >= 10 and step % 10 == 0 and not trace.loss[step] < trace.loss[step - 10]:
            flags["loss_not_decreasing"].append(step)
    return flags


def expected(kind: str, block: int):
    """Whether an alert is the right rule naming the right group for the fault."""
    group = f"block_{block}"
    return {
        "nan_grad": lambda a: a.rule == "nonfinite" and a.group == group,
        "inf_loss": lambda a: a.rule == "nonfinite" and a.group == "loss",
        "lr_spike": lambda a: a.rule in ("spike", "param_norm_jump", "exploding_gradient", "update_ratio"),
        "weights_x50": lambda a: a.group == group,
        "random_batch": lambda a: a.rule == "spike" and a.group == "loss",
        "zero_grads": lambda a: a.rule == "vanishing_gradient" and a.group == group,
    }[kind]


def run(seed: int, steps: int, fault: Fault | None, log_root: str) -> tuple[list, Trace]:
    pl.seed_everything(seed, verbose=False)
    model = FaultyGPT(CONFIG)
    if fault is not None and fault.kind == "inf_loss":
        model.inf_loss_step = fault.step
    data = PydocDataModule(block_size=CONFIG.block_size, batch_size=BATCH, train_samples=BATCH * (steps + 1), seed=seed)
    alerts: list = []
    trace = Trace()
    callbacks = ([fault] if fault is not None else []) + [
        trace, GradientMonitor(), ActivationProbe(), AnomalyAlert(on_anomaly=alerts.append)
    ]
    if fault is not None:
        callbacks.append(StopAfter(fault.step + INTERVAL + 5))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(log_root, name=f"s{seed}"),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, data)
    return alerts, trace


def first_within(flags, start: int) -> int | None:
    hits = [s for s in flags if start <= s <= start + INTERVAL]
    return min(hits) - start if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first", type=int, default=300, help="earliest injection step")
    parser.add_argument("--last", type=int, default=600, help="latest injection step")
    parser.add_argument("--clean-runs", type=int, default=3)
    parser.add_argument("--clean-steps", type=int, default=1000)
    # One thread: the model is small, and on a shared 2-core machine two threads per process oversubscribe.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.clean_runs, args.clean_steps = 1, 1, 400
    torch.set_num_threads(args.threads)
    started = time.time()
    log_root = tempfile.mkdtemp(prefix="llmdbg_faults_")

    rows = []
    for kind in FAULTS:
        ours, first_any, spike, sagemaker, false_before = [], [], [], [], 0
        for seed in range(args.seeds):
            rng = random.Random(f"{kind}-{seed}")
            step, block = rng.randint(args.first, args.last), rng.randrange(CONFIG.n_layer)
            fault = Fault(kind, step, block, seed)
            alerts, trace = run(seed, step + INTERVAL + 10, fault, log_root)
            right = expected(kind, block)
            ours.append(first_within([a.step for a in alerts if right(a)], step))
            first_any.append(first_within([a.step for a in alerts], step))
            false_before += sum(1 for a in alerts if a.step < step)
            spike.append(first_within(spike_detection_flags(trace.loss), step))
            # loss_not_decreasing flags almost half of its checks on clean runs: its hits are no evidence.
            sm = {k: v for k, v in sagemaker_flags(trace).items() if k != "loss_not_decreasing"}
            sagemaker.append((first_within([s for v in sm.values() for s in v], step),
                              sorted({k for k, v in sm.items() if any(step <= s <= step + INTERVAL for s in v)})))
            named = sorted({f"{a.rule}:{a.group}" for a in alerts if step <= a.step <= step + INTERVAL})
            print(f"{kind:13s} seed {seed} step {step} block {block} {fault.param_name}: ours {ours[-1]} {named[:4]}; "
                  f"SpikeDetection {spike[-1]}; SageMaker {sagemaker[-1]}", flush=True)
        rows.append((kind, ours, first_any, false_before, spike, sagemaker))

    clean = []
    for seed in range(args.clean_runs):
        alerts, trace = run(100 + seed, args.clean_steps, None, log_root)
        sm = sagemaker_flags(trace)
        clean.append((alerts, spike_detection_flags(trace.loss), sm))
        print(f"clean seed {100 + seed}: ours {[(a.step, a.title) for a in alerts]}; SpikeDetection "
              f"{len(clean[-1][1])} flags; SageMaker { {k: len(v) for k, v in sm.items()} }", flush=True)

    def recall(found) -> str:
        hits = [f for f in found if f is not None]
        return f"{len(hits)}/{len(found)}"

    def latency(found) -> str:
        hits = [f for f in found if f is not None]
        return f"{min(hits)}–{max(hits)}" if hits else "–"

    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({args.threads} threads); {time.time() - started:.0f} s\n")
    print("| fault | AnomalyAlert: right rule, right group | its latency (steps) | first alert of any rule (steps) "
          "| alerts before the fault | Lightning SpikeDetection (latency) | SageMaker Debugger rules (latency; which fired) |")
    print("|---|---|---|---|---|---|---|")
    for kind, ours, first_any, false_before, spike, sagemaker in rows:
        fired = sorted({r for _, rules in sagemaker for r in rules})
        sm = [s for s, _ in sagemaker]
        print(f"| {kind} | {recall(ours)} | {latency(ours)} | {latency(first_any)} | {false_before} | {recall(spike)} ({latency(spike)}) "
              f"| {recall(sm)} ({latency(sm)}; {', '.join(fired) or 'none'}) |")
    ours_false = sum(len(a) for a, _, _ in clean)
    spike_false = sum(len(s) for _, s, _ in clean)
    sm_false: dict[str, int] = defaultdict(int)
    for _, _, sm in clean:
        for k, v in sm.items():
            sm_false[k] += len(v)
    total_steps = args.clean_runs * args.clean_steps
    print(f"\nClean runs ({args.clean_runs} x {args.clean_steps} steps): AnomalyAlert {ours_false} alerts; "
          f"SpikeDetection {spike_false} flagged steps; SageMaker "
          + ", ".join(f"{k} {v}" for k, v in sorted(sm_false.items())) + f" flagged steps (of {total_steps}).")


if __name__ == "__main__":
    main()
