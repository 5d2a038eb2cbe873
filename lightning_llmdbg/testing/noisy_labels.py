"""A text-classification task with flipped labels that the repo builds itself, and a small transformer for it
(used by ``benchmarks/label_noise.py``, ``examples/classifier_label_noise.py`` and tests).

Sequences of 24 random filler tokens (ids 4..63) with one marker token (ids 0..3) at a random position; the class is
the marker. A fraction of the labels is flipped uniformly at random to another class.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

CLASSES, VOCAB, LENGTH = 4, 64, 24


def make_task(n: int, noise: float, seed: int) -> tuple[list[dict], torch.Tensor]:
    """Training items (input_ids, target, example_id) and the mask of flipped labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(CLASSES, VOCAB, (n, LENGTH), generator=g)
    clean = torch.randint(0, CLASSES, (n,), generator=g)
    tokens[torch.arange(n), torch.randint(0, LENGTH, (n,), generator=g)] = clean
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: round(noise * n)]] = True
    # Another class, uniformly: add 1..C-1 modulo C.
    target = torch.where(flipped, (clean + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES, clean)
    items = [{"input_ids": tokens[i], "target": target[i], "example_id": torch.tensor(i)} for i in range(n)]
    return items, flipped


class Classifier(pl.LightningModule):
    def __init__(self, width: int = 64, layers: int = 2, lr: float = 2e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(LENGTH, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)
        self.lr = lr
        self.correct = self.total = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids) + self.pos).mean(dim=1))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(batch["input_ids"])
        per_example = F.cross_entropy(logits, batch["target"], reduction="none")
        self.correct += int((logits.argmax(1) == batch["target"]).sum())
        self.total += len(batch["target"])
        return {"loss": per_example.mean(), "per_example_loss": per_example.detach(), "logits": logits.detach(), "target": batch["target"]}

    def on_train_epoch_start(self) -> None:
        self.correct = self.total = 0

    def on_train_epoch_end(self) -> None:
        # Accuracy on the noisy labels over the epoch's batches: stop once the noise is memorised.
        if self.correct / self.total >= 0.95:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
