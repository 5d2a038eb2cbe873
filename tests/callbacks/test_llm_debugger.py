"""LLMDebugger: the four callbacks in one line, configurable, with one checkpoint entry."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_llmdbg import ActivationProbe, AnomalyAlert, GradientMonitor, HardExampleLogger, LLMDebugger
from lightning_llmdbg.callbacks.llm_debugger import DEFAULTS
from tests.helpers import count_hooks, read_events, scalars, small_data, small_gpt, trainer_kwargs


class NaNGradientAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.model.transformer.h[1].mlp.c_fc.weight.grad.view(-1)[:3] = float("nan")


def test_one_line_runs_every_part_and_its_alerts_see_the_same_step(tmp_path):
    model = small_gpt()
    hooks_before = count_hooks(model)
    seen = []
    debugger = LLMDebugger(
        gradients={"every_n_steps": 2, "warmup_steps": 0},
        activations={"every_n_steps": 4},
        examples={"every_n_steps": 4, "k": 2},
        alerts={"action": "skip", "on_anomaly": seen.append},
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=9, logger=logger, callbacks=[debugger, NaNGradientAt(6)], **trainer_kwargs())
    trainer.fit(model, small_data())

    events = read_events(logger.log_dir)
    tags = set(events.Tags()["scalars"])
    assert sorted(scalars(events, "llmdbg/grad_norm/block_1")) == [0, 2, 4, 6, 8]
    assert sorted(scalars(events, "llmdbg/act/block_1/rms")) == [0, 4, 8]
    assert {"llmdbg/update_ratio/block_0", "llmdbg/attn/block_2/entropy_min", "llmdbg/alerts/count"} <= tags
    assert [e.step for e in events.Tensors("llmdbg/hard_examples/text_summary")] == [0, 4, 8]
    # The NaN at step 6 is named by group and skipped; GradientMonitor's sampled step 6 reached the rules too.
    assert {(a.step, a.group) for a in seen} >= {(6, "block_1")}
    assert debugger.alerts.skipped_steps_total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "gnorm" in trainer.progress_bar_metrics and trainer.progress_bar_metrics["llmdbg/alerts"] >= 1
    assert count_hooks(model) == hooks_before


def test_parts_are_configured_kept_or_switched_off():
    monitor = GradientMonitor(every_n_steps=3)
    debugger = LLMDebugger(gradients=monitor, activations={"every_n_steps": 7}, examples=False, alerts=False)
    assert list(debugger.parts) == ["gradients", "activations"]
    assert debugger.gradients is monitor
    assert isinstance(debugger.activations, ActivationProbe) and debugger.activations.schedule.every_n_steps == 7
    assert debugger.activations.modules == DEFAULTS["activations"]["modules"]
    with pytest.raises(AttributeError, match="'examples' part is switched off"):
        debugger.examples
    defaults = LLMDebugger()
    assert [type(p) for p in defaults.callbacks] == [GradientMonitor, ActivationProbe, HardExampleLogger, AnomalyAlert]
    assert defaults.gradients.update_ratio and defaults.gradients.schedule.every_n_steps == 25
    with pytest.raises(ValueError, match="`alerts` must be True, False, a dict of AnomalyAlert arguments.*got 'loud'"):
        LLMDebugger(alerts="loud")
    with pytest.raises(ValueError, match="every_n_steps"):
        LLMDebugger(gradients={"every_n_steps": 0})
    with pytest.raises(ValueError, match="every part is switched off"):
        LLMDebugger(gradients=False, activations=False, examples=False, alerts=False)


def test_checkpoint_holds_every_part_and_resume_continues_them(tmp_path):
    def debugger():
        return LLMDebugger(gradients={"every_n_steps": 2, "warmup_steps": 0}, activations={"every_n_steps": 2}, examples=False)

    first = debugger()
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[first], **trainer_kwargs(enable_checkpointing=True, default_root_dir=str(tmp_path)))
    trainer.fit(small_gpt(), small_data())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert set(state) == {"gradients", "activations", "alerts"}
    assert state["gradients"]["samples_taken"] == 2 and state["activations"]["last_sampled_step"] == 2

    resumed = debugger()
    trainer = pl.Trainer(max_steps=6, logger=False, callbacks=[resumed], **trainer_kwargs(default_root_dir=str(tmp_path)))
    trainer.fit(small_gpt(), small_data(), ckpt_path=str(ckpt))
    assert resumed.gradients.samples_taken == 3 and resumed.activations.samples_taken == 3
    assert resumed.alerts.alerts_total == 0

    # Resuming with a part switched off keeps the others' state.
    fewer = LLMDebugger(gradients={"every_n_steps": 2, "warmup_steps": 0}, activations=False, examples=False)
    trainer = pl.Trainer(max_steps=6, logger=False, callbacks=[fewer], **trainer_kwargs(default_root_dir=str(tmp_path)))
    trainer.fit(small_gpt(), small_data(), ckpt_path=str(ckpt))
    assert fewer.gradients.samples_taken == 3
