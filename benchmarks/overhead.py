"""Step-time overhead of GradientMonitor and its alternatives against a plain Trainer on the reference GPT.

All configurations run in one process, interleaved: each round fits every configuration once, in an order that
rotates from round to round, so that slow drifts of the machine (thermal, other tenants) fall on all alike.
A configuration's overhead in a round is its mean step time over the plain Trainer's in the same round; the
table reports the median over rounds. Mean (not median) step time, because a sampled step is the slow one.

Also measured in place, on the same gradients, at the same hook: the cost of one GradientMonitor sampled step
and the floor it is compared with, one bare ``torch._foreach_norm`` pass over all gradients with its result
moved to the host.

    python benchmarks/overhead.py                      # the numbers in BENCHMARKS.md
    python benchmarks/overhead.py --rounds 2 --steps 40  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from lightning_llmdbg import GradientMonitor  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts: everything a step costs, logging included."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def mean_step(self) -> float:
        times = [b - a for a, b in zip(self.starts[self.skip :], self.starts[self.skip + 1 :])]
        return statistics.fmean(times)


class LightningGradNorm(pl.Callback):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class TimedGradientMonitor(GradientMonitor):
    """Times each sampled step's measurement and writing, and beside it the floor on the same gradients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sampled_ms: list[float] = []
        self.floor_ms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        start = time.perf_counter()
        torch.stack(torch._foreach_norm(grads)).cpu()
        self.floor_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.sampled_ms.append((time.perf_counter() - start) * 1e3)


def fit(config: str, args: argparse.Namespace, log_root: str) -> tuple[float, pl.Callback | None]:
    pl.seed_everything(0, verbose=False)
    model = TinyGPTModule(GPTConfig())
    data = PydocDataModule(block_size=model.config.block_size, batch_size=args.batch_size, train_samples=args.steps * args.batch_size)
    loggers = [TensorBoardLogger(log_root, name=config)]
    extra: pl.Callback | None = None
    if config == "monitor_default":
        extra = GradientMonitor()
    elif config == "monitor_every_step":
        extra = GradientMonitor(every_n_steps=1)
    elif config == "monitor_every_step_timed":
        extra = TimedGradientMonitor(every_n_steps=1)
    elif config == "monitor_every_step_norm_only_timed":
        extra = TimedGradientMonitor(every_n_steps=1, absmax=False, param_norm=False)
    elif config == "lightning_grad_norm":
        extra = LightningGradNorm()
    if config.startswith("wandb"):
        from pytorch_lightning.loggers import WandbLogger

        wandb_logger = WandbLogger(save_dir=log_root, offline=True, project="llmdbg-bench", name=config)
        loggers.append(wandb_logger)
        if config == "wandb_watch_all":
            wandb_logger.watch(model, log="all", log_freq=1)
    timer = StepTimer(skip=args.skip)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=loggers,
        callbacks=[c for c in (extra, timer) if c is not None],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    if config.startswith("wandb"):
        import wandb

        wandb.finish()
    return timer.mean_step(), extra


CONFIGS = [
    "plain",
    "monitor_default",
    "monitor_every_step",
    "lightning_grad_norm",
    "wandb_logger_only",
    "wandb_watch_all",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=110, help="steps per fit (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=10, help="first steps of each fit left out of the mean")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    per_round: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as log_root:
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            times = {c: fit(c, args, log_root)[0] for c in order}
            for c in CONFIGS:
                per_round[c].append(times[c])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} {times[c] * 1e3:.1f}ms" for c in CONFIGS), flush=True)
        _, timed = fit("monitor_every_step_timed", args, log_root)
        _, timed_norm_only = fit("monitor_every_step_norm_only_timed", args, log_root)

    def ratio(config: str, base: str = "plain") -> float:
        return statistics.median(a / b for a, b in zip(per_round[config], per_round[base]))

    def median_ms(values: list[float]) -> float:
        return statistics.median(values[args.skip :])

    floor = median_ms(timed.floor_ms)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": "python " + " ".join(sys.argv),
        "plain_step_ms": statistics.median(per_round["plain"]) * 1e3,
        "ratios": {c: ratio(c) for c in CONFIGS if c != "plain"},
        "wandb_watch_vs_wandb_logger": ratio("wandb_watch_all", "wandb_logger_only"),
        "floor_ms": floor,
        "sampled_step_ms": median_ms(timed.sampled_ms),
        "sampled_step_norm_only_ms": median_ms(timed_norm_only.sampled_ms),
        "per_round_ms": {c: [t * 1e3 for t in v] for c, v in per_round.items()},
    }
    print(json.dumps(results, indent=2))
    print("\n| configuration | step time / plain Trainer |\n|---|---|")
    for c, v in results["ratios"].items():
        print(f"| {c} | {v:.4f} |")
    print(f"| wandb_watch_all / wandb_logger_only | {results['wandb_watch_vs_wandb_logger']:.4f} |")
    print(
        f"\nplain step {results['plain_step_ms']:.1f} ms; floor (one _foreach_norm pass + host copy) {floor:.3f} ms; "
        f"GradientMonitor sampled step {results['sampled_step_ms']:.3f} ms ({results['sampled_step_ms'] / floor:.2f}x floor); "
        f"norms only {results['sampled_step_norm_only_ms']:.3f} ms ({results['sampled_step_norm_only_ms'] / floor:.2f}x floor)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
