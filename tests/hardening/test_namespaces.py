"""Both Lightning namespaces: ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` take the callbacks."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from lightning_llmdbg import LLMDebugger
from lightning_llmdbg.testing import GPTConfig, TinyGPT
from tests.helpers import SMALL, count_hooks, independent_group_norms, read_events, scalars, small_data, trainer_kwargs

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def gpt_module(namespace):
    """The reference GPT as a LightningModule of ``namespace`` alone (a Trainer rejects the other one's modules)."""

    class GPTModule(namespace.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = TinyGPT(GPTConfig(**SMALL))
            self.norms = {}

        def forward(self, input_ids):
            return self.model(input_ids)

        def training_step(self, batch, batch_idx):
            logits = self(batch["input_ids"])
            token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            per_example = token_loss.view_as(batch["labels"]).mean(dim=1)
            return {"loss": per_example.mean(), "per_example_loss": per_example.detach()}

        def on_before_optimizer_step(self, optimizer):
            self.norms[self.trainer.global_step] = independent_group_norms(self)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return GPTModule()


@pytest.mark.parametrize("name", NAMESPACES)
def test_every_callback_runs_under_each_namespace(tmp_path, name):
    namespace = pytest.importorskip(name)
    loggers = importlib.import_module(f"{name}.loggers")
    model = gpt_module(namespace)
    every_step = {"every_n_steps": 1}
    debugger = LLMDebugger(
        gradients={**every_step, "update_ratio": True}, activations=every_step, examples={**every_step, "k": 2}
    )
    assert isinstance(debugger, namespace.Callback)
    logger = loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv = loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = namespace.Trainer(max_steps=3, logger=[logger, csv], callbacks=[debugger], **trainer_kwargs())
    data = small_data()
    data.setup("fit")
    trainer.fit(model, train_dataloaders=data.train_dataloader())

    events = read_events(logger.log_dir)
    for step, expected in model.norms.items():
        assert scalars(events, "llmdbg/grad_norm/total")[step] == pytest.approx(expected["total"], rel=1e-5)
    tags = set(events.Tags()["scalars"])
    assert {"llmdbg/act/block_0/rms", "llmdbg/attn/block_2/entropy_mean", "llmdbg/update_ratio/block_1"} <= tags
    assert [e.step for e in events.Tensors("llmdbg/hard_examples/text_summary")] == [0, 1, 2]
    assert count_hooks(model) == 0

    # The checkpoint carries the debugger's state under its key, and resuming restores it.
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert debugger.state_key in checkpoint["callbacks"]
    resumed = LLMDebugger(gradients=every_step, activations=every_step, examples={**every_step, "k": 2})
    trainer = namespace.Trainer(max_steps=4, logger=False, callbacks=[resumed], **trainer_kwargs())
    trainer.fit(gpt_module(namespace), train_dataloaders=data.train_dataloader(), ckpt_path=str(path))
    assert (resumed.gradients.samples_taken, resumed.activations.samples_taken) == (4, 4)
