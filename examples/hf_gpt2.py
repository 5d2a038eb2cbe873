"""A Hugging Face ``GPT2LMHeadModel`` (built from a small config: nothing to download) trained on Python's docs,
byte-level, with the debugger attached. Needs the ``hf`` extra: ``pip install "lightning-llmdbg[hf]"``.

    python examples/hf_gpt2.py                 # 300 steps, about a minute on 2 CPU cores
    python examples/hf_gpt2.py --steps 20

The blocks are found in ``transformer.h.*`` as GradientMonitor and ActivationProbe find them in any model;
attention entropy comes from ``transformer.h.*.attn``. The model keeps Hugging Face's default SDPA attention, whose
fused kernel never returns its weights: on sampled steps the probe forms them again from the queries and keys it
passes to ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_llmdbg import ActivationProbe, GradientMonitor  # noqa: E402
from lightning_llmdbg.testing import PydocDataModule  # noqa: E402


class GPT2Bytes(pl.LightningModule):
    """GPT-2 over bytes (vocabulary 256), with Hugging Face's ``attn_implementation`` (``"sdpa"`` or ``"eager"``)."""

    def __init__(
        self, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, block_size: int = 128, lr: float = 1e-3, attention: str = "sdpa"
    ) -> None:
        super().__init__()
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as err:
            raise ImportError('This example needs transformers: pip install "lightning-llmdbg[hf]"') from err
        config = GPT2Config(
            vocab_size=256, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        config._attn_implementation = attention
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # HF convention: `labels` are the inputs; the model shifts them itself.
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = GPT2Bytes(n_layer=args.n_layer)
    data = PydocDataModule(block_size=128, batch_size=args.batch_size, train_samples=args.steps * args.batch_size)
    logger = TensorBoardLogger(args.log_dir, name="hf_gpt2")
    callbacks = [
        GradientMonitor(groups="blocks", every_n_steps=10, update_ratio=True),
        ActivationProbe(modules=["transformer.h.*"], every_n_steps=50),
    ]
    trainer = pl.Trainer(
        max_steps=args.steps, logger=logger, callbacks=callbacks, accelerator="cpu", log_every_n_steps=10,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
    )
    trainer.fit(model, data)
    print(f"\nLogs: {logger.log_dir}\nOpen them with: tensorboard --logdir {logger.log_dir}")
    return Path(logger.log_dir)


if __name__ == "__main__":
    main()
