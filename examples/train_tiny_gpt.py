"""The main job: a ~2M-parameter byte-level GPT trained on Python's own documentation, with the whole debugger
attached (``LLMDebugger``) and one scheduled, announced fault so that the first run shows every dashboard and an
alert: the learning rate is multiplied by 100 for one step (step 250 by default).

    python examples/train_tiny_gpt.py               # 400 steps, about 80 seconds on 2 CPU cores
    python examples/train_tiny_gpt.py --no-fault    # the same run without the fault
    python examples/train_tiny_gpt.py --wandb       # also log to Weights & Biases (offline unless WANDB_MODE says otherwise)

It ends by printing where the logs are, the alerts raised, and the commands that open them
(``tensorboard --logdir ...`` and ``llmdbg report ...``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_llmdbg import Anomaly, LLMDebugger  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402


class LearningRateSpike(pl.Callback):
    """The demo's scheduled fault: every param group's learning rate times ``factor`` for the one optimizer step
    ``step``, then back (what a mis-set scheduler or a bad restart does)."""

    def __init__(self, step: int, factor: float = 100.0) -> None:
        self.step, self.factor = step, factor
        self._saved: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self._saved:
            groups = trainer.optimizers[0].param_groups
            self._saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] *= self.factor
            pl.utilities.rank_zero_info(f"\n>>> Scheduled fault: learning rate x{self.factor:g} at step {self.step}.")

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self._saved and trainer.global_step > self.step:
            for g, lr in zip(trainer.optimizers[0].param_groups, self._saved):
                g["lr"] = lr
            self._saved = []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--fault-step", type=int, default=250, help="step of the scheduled fault (default: %(default)s)")
    parser.add_argument("--no-fault", action="store_true", help="train without the scheduled fault")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root (default: %(default)s)")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    model = TinyGPTModule(GPTConfig(), lr=args.lr)
    data = PydocDataModule(block_size=model.config.block_size, batch_size=args.batch_size, train_samples=args.steps * args.batch_size)

    tensorboard = TensorBoardLogger(args.log_dir, name="tiny_gpt")
    loggers = [tensorboard]
    if args.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project="lightning-llmdbg-demo", save_dir=args.log_dir, offline=os.environ.get("WANDB_MODE") != "online"))

    alerts: list[Anomaly] = []
    debugger = LLMDebugger(
        gradients={"every_n_steps": 10, "histograms": True},
        activations={"every_n_steps": 50, "gradients": True, "histograms": True},
        examples={"every_n_steps": 50, "k": 8, "dynamics": True},
        alerts={"on_anomaly": alerts.append},
    )
    callbacks: list[pl.Callback] = [debugger]
    fault = not args.no_fault and args.fault_step < args.steps
    if fault:
        callbacks.append(LearningRateSpike(args.fault_step))
        print(f">>> This run has a scheduled fault: learning rate x100 at step {args.fault_step} (--no-fault turns it off).")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=loggers,
        callbacks=callbacks,
        val_check_interval=min(100, args.steps),
        limit_val_batches=4,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress_bar,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start

    log_dir = Path(tensorboard.log_dir).resolve()
    if trainer.is_global_zero:
        print(
            f"\nTrained {trainer.global_step} steps in {elapsed:.0f}s; gradients sampled on "
            f"{debugger.gradients.samples_taken} steps, activations on {debugger.activations.samples_taken}."
        )
        print(f"Alerts raised: {len(alerts)}" + (" (the scheduled fault was at step %d)" % args.fault_step if fault else ""))
        for anomaly in alerts[:10]:
            print(f"  step {anomaly.step}: {anomaly.rule} on {anomaly.group}: {anomaly.message}")
        print(f"TensorBoard logs: {log_dir}")
        print(f"Open them with:   tensorboard --logdir {log_dir}")
        print(f"Or, without a browser: llmdbg report {log_dir}")
    return log_dir


if __name__ == "__main__":
    main()
