"""Text classification with noisy labels: which training examples look mislabeled?

A small transformer classifier on a task the repo builds itself (one marker token decides the class; 20% of the
labels flipped). ``HardExampleLogger(dynamics=True)`` follows every example's margin over the run (the area under
the margin, AUM) and ranks the ones the model only ever fits against its own judgement: the flipped labels. At the
end it prints the most suspicious ids, how many of them were really flipped, and where the data map and the CSV of
all scores are.

    python examples/classifier_label_noise.py
    python examples/classifier_label_noise.py --n 400 --max-epochs 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_llmdbg import HardExampleLogger  # noqa: E402
from lightning_llmdbg.examples_stats import auroc  # noqa: E402
from lightning_llmdbg.testing.noisy_labels import Classifier, make_task  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="training examples")
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of labels flipped")
    parser.add_argument("--max-epochs", type=int, default=30, help="at most; training stops once the noise is memorised")
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    items, flipped = make_task(args.n, args.noise, args.seed)
    pl.seed_everything(args.seed, verbose=False)
    model = Classifier()
    examples = HardExampleLogger(k=8, every_n_steps=50, dynamics=True, attribution=False)
    logger = TensorBoardLogger(args.log_dir, name="label_noise")
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, accelerator="cpu", logger=logger, callbacks=[examples],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )
    loader = DataLoader(items, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    trainer.fit(model, loader)

    k = int(flipped.sum())
    ranked = examples.suspicious_examples()
    hits = int(flipped[torch.tensor(ranked[:k])].sum())
    scores = examples.dynamics_scores()
    result = {
        "epochs": trainer.current_epoch,
        "train_acc": model.correct / max(model.total, 1),
        "flipped": k,
        "precision_at_k": hits / k,
        "auroc": auroc(scores["suspicion"], flipped[scores["id"]]),
        "log_dir": Path(logger.log_dir),
    }
    print(f"\nTrained {result['epochs']} epochs; accuracy on the (noisy) training labels {result['train_acc']:.3f}.")
    print(f"{k} labels were flipped. Of the {k} most suspicious ids, {hits} are flipped ones "
          f"(precision {result['precision_at_k']:.3f}; AUROC {result['auroc']:.4f}).")
    print("Most suspicious ids: " + ", ".join(str(i) + ("*" if flipped[i] else "") for i in ranked[:12]) + "  (* = flipped)")
    print(f"Scores of every id: {result['log_dir'] / 'llmdbg_dynamics.csv'}")
    print(f"Data map and tables: tensorboard --logdir {result['log_dir']}  (Images: llmdbg/dynamics/data_map)")
    return result


if __name__ == "__main__":
    main()
