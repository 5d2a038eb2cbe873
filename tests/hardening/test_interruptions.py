"""An exception in training_step, a KeyboardInterrupt and `trainer.should_stop` leave no hook behind, leave every
completed step in the event file, and leave a checkpoint whose debugger state matches the steps it holds."""

import signal

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_llmdbg import LLMDebugger
from lightning_llmdbg.testing import TinyGPTModule
from tests.helpers import count_hooks, read_events, scalars, small_data, small_gpt, trainer_kwargs

STOP_AT = 3
MEASURING_PARTS = ("gradients", "activations", "examples")


class StopsAt(TinyGPTModule):
    def __init__(self, config, kind):
        super().__init__(config)
        self.kind = kind

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == STOP_AT:
            if self.kind == "exception":
                raise RuntimeError("a bug in training_step")
            if self.kind == "keyboard_interrupt":
                raise KeyboardInterrupt
            self.trainer.should_stop = True  # this step still completes
        return super().training_step(batch, batch_idx)


def every_step_debugger():
    every = {"every_n_steps": 1}
    return LLMDebugger(
        gradients={**every, "warmup_steps": 0, "histograms": True},
        activations={**every, "gradients": True, "histograms": True},
        examples={**every, "k": 2},
    )


@pytest.mark.parametrize("kind", ["exception", "keyboard_interrupt", "should_stop"])
def test_an_interrupted_fit_leaves_no_hooks_flushed_logs_and_a_consistent_checkpoint(tmp_path, kind):
    model = StopsAt(small_gpt().config, kind)
    debugger = every_step_debugger()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    on_exception = OnExceptionCheckpoint(dirpath=str(tmp_path), filename="interrupted")
    trainer = pl.Trainer(
        max_steps=8, logger=logger, callbacks=[debugger, on_exception], **trainer_kwargs(enable_checkpointing=True)
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        if kind == "exception":
            with pytest.raises(RuntimeError, match="a bug in training_step"):
                trainer.fit(model, small_data())
        elif kind == "keyboard_interrupt":
            with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with status 1
                trainer.fit(model, small_data())
        else:
            trainer.fit(model, small_data())
            trainer.save_checkpoint(tmp_path / "interrupted.ckpt")
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl+C after the first

    assert count_hooks(model) == 0
    assert not [k for m in model.modules() for k in vars(m) if k.startswith("_llmdbg")]  # the probe's sums are gone
    completed = list(range(STOP_AT + 1 if kind == "should_stop" else STOP_AT))
    events = read_events(logger.log_dir)  # a fresh reader: only what reached the file
    for tag in ("llmdbg/grad_norm/total", "llmdbg/update_ratio/block_0", "llmdbg/act/block_1/rms", "llmdbg/act_grad/block_2/rms"):
        assert sorted(scalars(events, tag)) == completed, tag
    assert [e.step for e in events.Histograms("llmdbg/grad_hist/block_0")] == completed
    assert [e.step for e in events.Tensors("llmdbg/hard_examples/text_summary")] == completed

    checkpoint = torch.load(tmp_path / "interrupted.ckpt", weights_only=False)
    assert checkpoint["global_step"] == len(completed)
    state = checkpoint["callbacks"]["LLMDebugger"]
    for part in MEASURING_PARTS:
        assert (state[part]["samples_taken"], state[part]["last_sampled_step"]) == (len(completed), completed[-1]), part
    assert state["alerts"]["alerts_total"] == 0

    # Resuming continues each schedule from the next step, with the same hooks discipline.
    resumed = every_step_debugger()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=1)
    trainer = pl.Trainer(max_steps=6, logger=logger, callbacks=[resumed], **trainer_kwargs())
    model = StopsAt(small_gpt().config, "none")
    trainer.fit(model, small_data(), ckpt_path=str(tmp_path / "interrupted.ckpt"))
    assert count_hooks(model) == 0
    # (How far Lightning goes after a mid-epoch checkpoint is its own business: from the exception checkpoint it
    # finishes the interrupted epoch's step and stops.)
    assert trainer.global_step > len(completed)
    logged = sorted(scalars(read_events(logger.log_dir), "llmdbg/grad_norm/total"))
    assert logged == list(range(len(completed), trainer.global_step))
    for part in MEASURING_PARTS:
        assert getattr(resumed, part).samples_taken == trainer.global_step, part
