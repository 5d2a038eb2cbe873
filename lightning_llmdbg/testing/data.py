"""Byte-level language-model data from ``pydoc_data.topics``: about 465 KB of English prose every Python ships."""

from __future__ import annotations

import functools

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> bytes:
    """The text of Python's bundled documentation topics, as UTF-8 bytes, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteWindows(Dataset):
    """``num_samples`` windows of ``block_size + 1`` bytes at seeded random offsets; item -> dict of input/labels.

    ``labels`` are the inputs shifted by one (the HF causal-LM convention without the shift in the model);
    ``example_id`` is the window's index.
    """

    def __init__(self, data: torch.Tensor, block_size: int, num_samples: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data = data
        self.block_size = block_size
        self.offsets = torch.randint(0, len(data) - block_size - 1, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        chunk = self.data[start : start + self.block_size + 1].long()
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "example_id": torch.tensor(index)}


class PydocDataModule(pl.LightningDataModule):
    """Train/validation windows over the pydoc corpus (the last 10% of bytes are held out for validation).

    Args:
        block_size: tokens (bytes) per sequence.
        batch_size: sequences per batch.
        train_samples: windows per training epoch.
        val_samples: validation windows.
        seed: seeds the window offsets.
    """

    def __init__(
        self, block_size: int = 128, batch_size: int = 16, train_samples: int = 4096, val_samples: int = 256, seed: int = 0
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        data = torch.frombuffer(bytearray(pydoc_corpus()), dtype=torch.uint8)
        split = int(len(data) * 0.9)
        self.train_set = ByteWindows(data[:split], self.block_size, self.train_samples, self.seed)
        self.val_set = ByteWindows(data[split:], self.block_size, self.val_samples, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
