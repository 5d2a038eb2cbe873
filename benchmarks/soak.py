"""Soak: the small reference GPT for thousands of steps with every callback at every step.

With ``--defaults``, ``LLMDebugger()`` at its defaults instead. Records, every ``--every`` steps: resident memory (VmRSS), the number of module hooks, and the size of the log
folder. The debugger passes when memory stops growing after warm-up (the test asserts < 50 MB from step
``--warmup`` to the end), the hook count never changes, and the logs grow linearly (the rate per step is printed
and recorded in BENCHMARKS.md).

    python benchmarks/soak.py --steps 3000 --out /tmp/soak [--json result.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_llmdbg import LLMDebugger  # noqa: E402
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402
from lightning_llmdbg.testing.hooks import count_hooks  # noqa: E402

CONFIG = dict(vocab_size=256, block_size=32, n_layer=3, n_head=4, n_embd=32)


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Record(pl.Callback):
    def __init__(self, every: int, log_dir: Path) -> None:
        self.every, self.log_dir = every, log_dir
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step  # steps taken so far
        if step % self.every == 0:
            gc.collect()
            trainer.logger.experiment.flush()
            self.rows.append({
                "step": step,
                "rss_mb": round(resident_mb(), 1),
                "hooks": count_hooks(pl_module),
                "log_bytes": folder_bytes(self.log_dir),
                "seconds": round(time.perf_counter() - self.start, 1),
            })


def soak(steps: int, out: Path, every: int = 100, defaults: bool = False) -> list[dict]:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    model = TinyGPTModule(GPTConfig(**CONFIG))
    data = PydocDataModule(block_size=CONFIG["block_size"], batch_size=4, train_samples=256)
    all_steps = {"every_n_steps": 1}
    debugger = LLMDebugger() if defaults else LLMDebugger(
        gradients={**all_steps, "warmup_steps": 0, "update_ratio": True, "histograms": True},
        activations={**all_steps, "gradients": True, "histograms": True},
        examples={**all_steps, "k": 4, "dynamics": True},
        alerts={},
    )
    logger = TensorBoardLogger(str(out), name="soak", version=0)
    record = Record(every, Path(logger.log_dir))
    trainer = pl.Trainer(
        max_steps=steps, logger=logger, callbacks=[debugger, record], accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
    )
    record.rows.append({"step": 0, "rss_mb": round(resident_mb(), 1), "hooks": count_hooks(model), "log_bytes": 0, "seconds": 0.0})
    trainer.fit(model, data)
    return record.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--defaults", action="store_true", help="LLMDebugger() at its defaults instead of every step")
    args = parser.parse_args()
    rows = soak(args.steps, args.out, args.every, args.defaults)
    print(f"{'step':>6} {'RSS MB':>8} {'hooks':>6} {'log KB':>9} {'s':>7}")
    for r in rows:
        print(f"{r['step']:>6} {r['rss_mb']:>8.1f} {r['hooks']:>6} {r['log_bytes'] / 1024:>9.0f} {r['seconds']:>7.1f}")
    warm = next(r for r in rows if r["step"] >= args.warmup)
    last = rows[-1]
    rate = (last["log_bytes"] - warm["log_bytes"]) / max(last["step"] - warm["step"], 1)
    print(f"RSS growth after step {warm['step']}: {last['rss_mb'] - warm['rss_mb']:+.1f} MB "
          f"(peak {max(r['rss_mb'] for r in rows if r['step'] >= warm['step']):.1f} MB); "
          f"hooks seen: {sorted({r['hooks'] for r in rows})}; logs grow {rate / 1024:.1f} KB/step")
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
