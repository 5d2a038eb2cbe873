"""Manual optimization with one or two optimizers: every part measures, alerts and skips as under automatic
optimization. (Under manual optimization each `optimizer.step()` advances `global_step`; the parts read their
schedule once per batch, at the step the batch starts on.)"""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_llmdbg import LLMDebugger
from lightning_llmdbg.testing import TinyGPTModule
from tests.helpers import (
    count_hooks, independent_group_norms, read_events, scalars, small_data, small_gpt, trainer_kwargs,
)

BATCHES = 4
NAN_BATCH = 2  # a NaN in a block's gradient: optimizer 0's parameters
HUGE_BATCH = 3  # with two optimizers, a finite but exploding head gradient: optimizer 1's, checked after 0 stepped


class Manual(TinyGPTModule):
    def __init__(self, config, optimizers):
        super().__init__(config)
        self.automatic_optimization = False
        self.n_optimizers = optimizers
        self.norms = {}

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        blocks = list(self.model.transformer.h.parameters())
        ids = {id(p) for p in blocks}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return torch.optim.SGD(blocks, lr=0.01), torch.optim.SGD(rest, lr=0.01)

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss, per_example = self._losses(batch)
        self.manual_backward(loss)
        if batch_idx == NAN_BATCH:
            self.model.transformer.h[1].mlp.c_fc.weight.grad.view(-1)[:3] = float("nan")
        if batch_idx == HUGE_BATCH and self.n_optimizers == 2:
            self.model.lm_head.weight.grad.mul_(1e6)
            self.head_before = self.model.lm_head.weight.detach().clone()
        self.norms[batch_idx] = independent_group_norms(self)["total"]
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()  # the usual manual loop: gradients are gone (None) by the end of the batch
        return {"loss": loss.detach(), "per_example_loss": per_example.detach()}


@pytest.mark.parametrize("optimizers", [1, 2])
def test_manual_optimization_is_measured_alerted_and_skipped(tmp_path, optimizers):
    model = Manual(small_gpt().config, optimizers)
    every = {"every_n_steps": 1}
    seen = []
    debugger = LLMDebugger(
        gradients={**every, "warmup_steps": 0}, activations=every, examples={**every, "k": 2},
        alerts={"action": "skip", "on_anomaly": seen.append},
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(max_steps=BATCHES * optimizers, logger=logger, callbacks=[debugger], **trainer_kwargs())
    trainer.fit(model, small_data())

    batch_steps = [optimizers * b for b in range(BATCHES)]  # the global step each batch starts on
    events = read_events(logger.log_dir)
    totals = ["total"] if optimizers == 1 else ["total_opt0", "total_opt1"]
    assert sorted(scalars(events, f"llmdbg/grad_norm/{totals[0]}")) == batch_steps
    if optimizers == 2:  # skipping drops every optimizer's gradients, so the second has none to measure then
        assert sorted(scalars(events, "llmdbg/grad_norm/total_opt1")) == [s for s in batch_steps if s != batch_steps[NAN_BATCH]]
    if optimizers == 1:
        logged = scalars(events, "llmdbg/grad_norm/total")
        for batch, expected in model.norms.items():
            if batch != NAN_BATCH:
                assert logged[batch_steps[batch]] == pytest.approx(expected, rel=1e-5)
    assert sorted(scalars(events, "llmdbg/update_ratio/block_0")) == batch_steps
    assert sorted(scalars(events, "llmdbg/act/block_0/rms")) == batch_steps
    assert [e.step for e in events.Tensors("llmdbg/hard_examples/text_summary")] == batch_steps
    assert {a.step for a in seen if a.rule == "nonfinite"} == {batch_steps[NAN_BATCH]}
    assert any(a.group == "block_1" for a in seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN update was skipped
    if optimizers == 2:  # GradientMonitor's norm of optimizer 1's groups exceeds the ceiling: its update is skipped
        assert {(a.step, a.group) for a in seen if a.rule == "exploding_gradient"} >= {(batch_steps[HUGE_BATCH], "head")}
        assert torch.equal(model.model.lm_head.weight, model.head_before)
    assert count_hooks(model) == 0
