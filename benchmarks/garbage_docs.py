"""Do the run's hardest sequences find garbage documents?

The reference GPT (``lightning_llmdbg.testing.TinyGPTModule`` at its default size, 1.9M parameters) trains for two
epochs on byte windows of the pydoc corpus in which 1% of the sequences were replaced by uniformly random bytes.
``HardExampleLogger(k=number of garbage sequences)`` keeps the run's k hardest sequences (each id once, at its
hardest presentation: a garbage sequence first seen before the model has learned anything is as hard as any text
then, and is caught on its second presentation); reported: precision@k of
those for the garbage sequences, and the same for ``suspicious_examples()`` (mean loss per id over the run).

    python benchmarks/garbage_docs.py                 # the numbers in BENCHMARKS.md
    python benchmarks/garbage_docs.py --samples 512   # a quick look
"""

from __future__ import annotations

import argparse
import logging
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
from lightning_llmdbg.testing import GPTConfig, PydocDataModule, TinyGPTModule  # noqa: E402


class WithGarbage(PydocDataModule):
    """The pydoc windows, with the windows in ``garbage`` replaced by random bytes (fixed per window)."""

    def __init__(self, garbage: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.garbage = garbage

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        clean, garbage, block = self.train_set.__getitem__, self.garbage, self.block_size

        def getitem(index: int) -> dict:
            item = clean(index)
            if index in garbage:
                noise = torch.randint(0, 256, (block + 1,), generator=torch.Generator().manual_seed(index))
                item = {"input_ids": noise[:-1], "labels": noise[1:], "example_id": item["example_id"]}
            return item

        self.items = [getitem(i) for i in range(len(self.train_set))]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(self.seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048, help="training sequences")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.01, help="fraction replaced by random bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_llmdbg").setLevel(logging.ERROR)

    g = torch.Generator().manual_seed(args.seed)
    garbage = set(torch.randperm(args.samples, generator=g)[: round(args.fraction * args.samples)].tolist())
    k = len(garbage)
    pl.seed_everything(args.seed, verbose=False)
    model = TinyGPTModule(GPTConfig())
    logger = HardExampleLogger(k=k, dynamics=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, default_root_dir=tempfile.mkdtemp(), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[logger],
    )
    start = time.perf_counter()
    trainer.fit(model, WithGarbage(garbage, block_size=128, batch_size=16, train_samples=args.samples, seed=args.seed))
    seconds = time.perf_counter() - start

    run = [row for row in logger.last_logged if row["scope"] == "run"]
    hardest_ids = [row["id"] for row in run]
    precision = sum(i in garbage for i in hardest_ids) / k
    suspicious = logger.suspicious_examples(k)
    suspicious_precision = sum(i in garbage for i in suspicious) / k
    first_step_of_garbage = min(row["step"] for row in run if row["id"] in garbage)
    print(f"\nreference GPT, pydoc corpus, {args.samples} sequences of 128 bytes ({args.epochs} epochs, {trainer.global_step} steps), "
          f"{k} replaced by random bytes; seed {args.seed}; {seconds:.0f} s\n")
    print("| ranking | k | precision@k |")
    print("|---|---|---|")
    print(f"| the run's hardest sequences (HardExampleLogger table, scope `run`) | {k} | **{precision:.3f}** |")
    print(f"| `suspicious_examples()` (mean loss per id) | {k} | {suspicious_precision:.3f} |")
    missed = sorted(garbage - set(hardest_ids))
    print(f"\ngarbage sequences not among the run's hardest: {missed} (first garbage row in the table from step {first_step_of_garbage})")
    sys.exit(0 if precision >= 0.9 else 1)


if __name__ == "__main__":
    main()
