"""``llmdbg report`` on the logs of a real run with a known fault and a known alert."""

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_llmdbg import ActivationProbe, GradientMonitor
from lightning_llmdbg.report import main
from lightning_llmdbg.writers import Writers
from tests.helpers import small_data, small_gpt, trainer_kwargs


class AlertAtStep(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5:
            Writers.for_trainer(trainer).alert("spike: grad_norm/block_1", "40x its baseline", step=5, level="ERROR")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> Path:
    """Block 1's MLP pre-activations pushed to -10: its GELU outputs are never positive (every channel dead)."""
    model = small_gpt()
    with torch.no_grad():
        model.model.transformer.h[1].mlp.c_fc.bias.fill_(-10.0)
    logger = TensorBoardLogger(str(tmp_path_factory.mktemp("logs")), name="run")
    callbacks = [
        GradientMonitor(every_n_steps=1),
        ActivationProbe(modules=["transformer.h.*.mlp.gelu"], every_n_steps=2),
        AlertAtStep(),
    ]
    pl.Trainer(max_steps=12, logger=logger, callbacks=callbacks, **trainer_kwargs()).fit(model, small_data())
    return Path(logger.log_dir)


def test_report_names_the_alert_the_dead_layer_and_writes_plots(faulty_run, tmp_path, capsys):
    assert main(["report", str(faulty_run), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "- step 5: spike: grad_norm/block_1" in text
    dead = [line for line in text.splitlines() if "channels are dead" in line]
    assert len(dead) == 1 and "100% of transformer.h.1.mlp.gelu" in dead[0], dead
    assert "likely cause:" in text and "next step:" in text
    heatmap = Image.open(tmp_path / "grad_norm_heatmap.png")
    assert heatmap.width > 100 and heatmap.height > 16 * 6  # embeddings, 3 blocks, ln_f, head
    assert Image.open(tmp_path / "activation_rms.png").height > 16 * 3


def test_a_healthy_parent_dir_is_searched_for_runs(faulty_run, capsys):
    assert main(["report", str(faulty_run.parent.parent)]) == 0
    assert str(faulty_run) in capsys.readouterr().out
    assert (faulty_run / "llmdbg_report" / "grad_norm_heatmap.png").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_missing_or_empty_logdir_is_a_clear_error(make, tmp_path, capsys):
    logdir = tmp_path / "nothing_here"
    if make == "empty":
        logdir.mkdir()
    assert main(["report", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert str(logdir) in err
    assert ("does not exist" in err) if make == "missing" else ("No TensorBoard event files" in err)


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "llmdbg").exists(), "pip install -e . should install the `llmdbg` command"
