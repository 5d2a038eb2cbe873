"""Does ``HardExampleLogger(dynamics=True).suspicious_examples()`` find flipped labels?

Offline, on the CPU. A task this script builds itself: sequences of 24 random filler tokens (ids 4..63) with one
marker token (ids 0..3) at a random position; the class is the marker. A small transformer classifier (2 encoder
layers, width 64, mean-pooled) learns the rule within a few epochs; 20% of the training labels are flipped
uniformly at random to another class, and training goes on until the model has memorised the noise (accuracy on the
noisy training labels, measured on the training batches of an epoch, at least 0.95). Then, per seed:

- AUROC and precision@k (k = the number of flipped labels) of the callback's suspicion scores (minus the area under
  the margin over the run) against the flip mask;
- the same for the end-of-training per-example loss (each example's loss at its last presentation) of the same run,
  the baseline a loss-only view gives.

    python benchmarks/label_noise.py              # the numbers in BENCHMARKS.md (3 seeds)
    python benchmarks/label_noise.py --seeds 0    # one seed
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_llmdbg import HardExampleLogger  # noqa: E402
from lightning_llmdbg.examples_stats import auroc, precision_at_k  # noqa: E402
from lightning_llmdbg.testing.noisy_labels import CLASSES, Classifier, make_task  # noqa: E402

def run(seed: int, n: int, noise: float, max_epochs: int) -> dict:
    items, flipped = make_task(n, noise, seed)
    pl.seed_everything(seed, verbose=False)
    model = Classifier()
    logger = HardExampleLogger(k=16, every_n_steps=10**9, dynamics=True, attribution=False, log_text=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, default_root_dir=tempfile.mkdtemp(), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[logger],
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(items, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(seed)))
    seconds = time.perf_counter() - start
    scores = logger.dynamics_scores()
    assert scores["id"].tolist() == list(range(n))
    k = int(flipped.sum())
    ranked = logger.suspicious_examples()
    return {
        "seed": seed,
        "epochs": trainer.current_epoch,
        "train_acc": model.correct / model.total,
        "auroc": auroc(scores["suspicion"], flipped),
        "precision": flipped[torch.tensor(ranked[:k])].float().mean().item(),
        "loss_auroc": auroc(scores["last_loss"], flipped),
        "loss_precision": precision_at_k(scores["last_loss"], flipped, k),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=1000, help="training examples")
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of labels flipped")
    parser.add_argument("--max-epochs", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_llmdbg").setLevel(logging.ERROR)
    results = [run(seed, args.n, args.noise, args.max_epochs) for seed in args.seeds]
    print(f"\n{args.n} examples, {args.noise:.0%} labels flipped, {CLASSES} classes; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| seed | epochs | train acc (noisy labels) | AUROC, suspicion (−AUM) | precision@k | AUROC, end-of-training loss | precision@k | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['epochs']} | {r['train_acc']:.3f} | **{r['auroc']:.4f}** | {r['precision']:.3f} | "
              f"{r['loss_auroc']:.4f} | {r['loss_precision']:.3f} | {r['seconds']:.0f} |")
    ok = all(r["auroc"] >= 0.97 and r["auroc"] > r["loss_auroc"] and r["train_acc"] >= 0.95 for r in results)
    print(f"\nAUROC >= 0.97 and above the loss ranking in every seed, noise memorised: {'yes' if ok else 'NO'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
