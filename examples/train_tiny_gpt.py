"""The main job: a ~2M-parameter byte-level GPT trained on Python's own documentation, with the debugger attached.

    python examples/train_tiny_gpt.py            # ~400 steps, about 2 minutes on 2 CPU cores
    python examples/train_tiny_gpt.py --wandb    # also log to Weights & Biases (offline unless WANDB_MODE says otherwise)

Then open the charts with the `tensorboard --logdir ...` command it prints at the end.
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

from lightning_llmdbg import ActivationProbe, GradientMonitor, Signals  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every-n-steps", type=int, default=10, help="GradientMonitor sampling interval")
    parser.add_argument("--probe-every-n-steps", type=int, default=50, help="ActivationProbe sampling interval")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root (default: %(default)s)")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B")
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

    monitor = GradientMonitor(groups="blocks", every_n_steps=args.every_n_steps, warmup_steps=10, update_ratio=True, histograms=True)
    last_norms: dict = {}

    def keep_grad_norms(signals: Signals) -> None:  # what other callbacks do with a monitor's measurements
        norms = {k.rsplit("/", 1)[1]: v for k, v in signals.values.items() if k.startswith("llmdbg/grad_norm/")}
        if norms:
            last_norms.clear()
            last_norms.update(step=signals.step, **norms)

    monitor.subscribe(keep_grad_norms)
    probe = ActivationProbe(modules="blocks", every_n_steps=args.probe_every_n_steps, gradients=True, histograms=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=loggers,
        callbacks=[monitor, probe],
        val_check_interval=min(100, args.steps),
        limit_val_batches=4,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start

    log_dir = Path(tensorboard.log_dir).resolve()
    if trainer.is_global_zero:
        print(
            f"\nTrained {trainer.global_step} steps in {elapsed:.0f}s; GradientMonitor sampled {monitor.samples_taken} "
            f"of them, ActivationProbe {probe.samples_taken}."
        )
        if last_norms:
            step = last_norms.pop("step")
            print(f"Gradient norms at step {step}: " + ", ".join(f"{g} {v:.3g}" for g, v in last_norms.items()))
        print(f"TensorBoard logs: {log_dir}")
        print(f"Open them with:   tensorboard --logdir {log_dir}")
    return log_dir


if __name__ == "__main__":
    main()
