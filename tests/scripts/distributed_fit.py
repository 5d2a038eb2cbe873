"""Fit the small reference GPT with the debugger on 1 process, DDP or FSDP2 (2 CPU processes, gloo).

Run as a script (Lightning's launcher re-runs ``sys.argv`` for the second rank, so it cannot run inside pytest):

    python tests/scripts/distributed_fit.py {single,ddp,fsdp} OUT_DIR [--precision P] [--accumulate N] [--every-callback]
    python tests/scripts/distributed_fit.py {single,ddp,fsdp} OUT_DIR --hf-sdpa [--fail-capture-on-rank R]

Without ``--every-callback`` it runs GradientMonitor and ActivationProbe with histograms; with it, all four
callbacks at every step. Either way it writes ``OUT_DIR/<mode>/reference_norms.json``: the total gradient norm at
each optimizer step, computed here independently of the package (float64, full tensors under FSDP2).

With ``--hf-sdpa`` the model is a small Hugging Face GPT-2 under SDPA attention and the callback ActivationProbe alone
(every step, ``transformer.h.*``), whose attention entropy comes from weights formed again; ``--fail-capture-on-rank``
makes forming them fail on that rank only.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from pytorch_lightning.plugins import MixedPrecision  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_llmdbg import ActivationProbe, AnomalyAlert, GradientMonitor, HardExampleLogger, stats  # noqa: E402
from lightning_llmdbg.testing import PydocDataModule, TinyGPTModule  # noqa: E402
from tests.helpers import RecordGradNorms, small_data, small_gpt, trainer_kwargs  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3


class InterleavedData(PydocDataModule):
    """Rank r takes windows r, r + 2, ... in order, so both ranks together see the single process's batch."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.train_set, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)


def shard_blocks_then_model(module: pl.LightningModule) -> None:
    """FSDP2 over the data-parallel mesh: each of ``module.model.transformer.h`` on its own, then the rest."""
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for block in module.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(module.model, mesh=mesh)


class ShardedGPT(TinyGPTModule):
    def configure_model(self) -> None:
        shard_blocks_then_model(self)


class RecordTotalNorm(RecordGradNorms):
    """The independent norms where GradientMonitor measures them; rank zero writes the totals at the end."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({step: norms["total"] for step, norms in self.by_step.items()}))


def precision_settings(precision: str) -> dict:
    # Lightning turns `precision="16-mixed"` on the CPU into bf16; the plugin keeps fp16 autocast and a GradScaler.
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def debugger_callbacks(every_callback: bool) -> list[pl.Callback]:
    monitor = GradientMonitor(every_n_steps=1, update_ratio=True, histograms=True, histogram_bins=8)
    probe = ActivationProbe(every_n_steps=1, gradients=True, histograms=True)
    if not every_callback:
        return [monitor, probe]
    return [monitor, probe, HardExampleLogger(k=2, every_n_steps=1), AnomalyAlert()]


def fail_capture_on_rank(rank: int) -> None:
    recompute = stats.scaled_dot_product_attention_partials

    def failing(*args, **kwargs):
        if dist.is_initialized() and dist.get_rank() == rank:
            raise RuntimeError(f"injected on rank {rank}")
        return recompute(*args, **kwargs)

    stats.scaled_dot_product_attention_partials = failing


def hf_sdpa_model(mode: str) -> pl.LightningModule:
    from tests.callbacks.test_activation_probe_hf import HFGPT2  # transformers: only for --hf-sdpa

    class ShardedHFGPT2(HFGPT2):
        def configure_model(self) -> None:
            shard_blocks_then_model(self)

    pl.seed_everything(0, verbose=False)  # the same weights on every rank, as fully_shard expects
    return ShardedHFGPT2("sdpa") if mode == "fsdp" else HFGPT2("sdpa")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ddp", "fsdp"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--every-callback", action="store_true")
    parser.add_argument("--hf-sdpa", action="store_true")
    parser.add_argument("--fail-capture-on-rank", type=int)
    args = parser.parse_args()
    if args.fail_capture_on_rank is not None:
        fail_capture_on_rank(args.fail_capture_on_rank)

    devices = 1 if args.mode == "single" else 2
    if args.mode == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.mode == "ddp" else "auto"
    if args.hf_sdpa:
        model = hf_sdpa_model(args.mode)
    elif args.mode == "fsdp":
        config = small_gpt().config
        # The same seed as `small_gpt`, on every rank: fully_shard shards each rank's own initial weights.
        pl.seed_everything(0, verbose=False)
        model = ShardedGPT(config)
    else:
        model = small_gpt()
    if args.hf_sdpa:
        callbacks = [ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)]
    else:
        callbacks = debugger_callbacks(args.every_callback)
    log_dir = args.out_dir / args.mode
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=TensorBoardLogger(args.out_dir, name=args.mode, version=0),
        callbacks=[*callbacks, RecordTotalNorm(log_dir / "reference_norms.json")],
        use_distributed_sampler=False,
        accumulate_grad_batches=args.accumulate,
        **precision_settings(args.precision),
        **trainer_kwargs(devices=devices, strategy=strategy),
    )
    data = small_data(batch_size=GLOBAL_BATCH // devices)
    trainer.fit(model, InterleavedData(data.block_size, data.batch_size, data.train_samples))
    taken = [getattr(c, "samples_taken", STEPS) for c in callbacks]
    assert taken == [STEPS] * len(callbacks), taken
    assert trainer.global_step == STEPS


if __name__ == "__main__":
    main()
