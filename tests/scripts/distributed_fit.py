"""Fit the small reference GPT with GradientMonitor on 1 process, DDP or FSDP2 (2 CPU processes, gloo).

Run as a script (Lightning's launcher re-runs ``sys.argv`` for the second rank, so it cannot run inside pytest):

    python tests/scripts/distributed_fit.py {single,ddp,fsdp} OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_llmdbg import ActivationProbe, GradientMonitor  # noqa: E402
from lightning_llmdbg.testing import PydocDataModule, TinyGPTModule  # noqa: E402
from tests.helpers import small_data, small_gpt, trainer_kwargs  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3


class InterleavedData(PydocDataModule):
    """Rank r takes windows r, r + 2, ... in order, so both ranks together see the single process's batch."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.train_set, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)


class ShardedGPT(TinyGPTModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def main(mode: str, out_dir: str) -> None:
    devices = 1 if mode == "single" else 2
    if mode == "fsdp":
        config = small_gpt().config
        # The same seed as `small_gpt`, on every rank: fully_shard shards each rank's own initial weights.
        pl.seed_everything(0, verbose=False)
        model = ShardedGPT(config)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        model = small_gpt()
        strategy = "ddp" if mode == "ddp" else "auto"
    monitor = GradientMonitor(every_n_steps=1, update_ratio=True, histograms=True, histogram_bins=8)
    probe = ActivationProbe(every_n_steps=1, gradients=True, histograms=True)
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=TensorBoardLogger(out_dir, name=mode, version=0),
        callbacks=[monitor, probe],
        use_distributed_sampler=False,
        **trainer_kwargs(devices=devices, strategy=strategy),
    )
    data = small_data(batch_size=GLOBAL_BATCH // devices)
    trainer.fit(model, InterleavedData(data.block_size, data.batch_size, data.train_samples))
    assert monitor.samples_taken == probe.samples_taken == STEPS, (monitor.samples_taken, probe.samples_taken)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
