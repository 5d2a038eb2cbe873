import logging
import sys

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_llmdbg import GradientMonitor
from lightning_llmdbg.stats import Histogram
from lightning_llmdbg.testing.wandb_records import read_finished_run
from lightning_llmdbg.writers import HEALTH_CATEGORY, Writers, import_wandb
from tests.helpers import read_events, scalars, small_data, small_gpt, trainer_kwargs


class _TrainerView:
    """What Writers reads of a Trainer: whether this is global rank zero, and the loggers."""

    def __init__(self, is_global_zero, loggers):
        self.is_global_zero = is_global_zero
        self.loggers = loggers


def _fit(tmp_path, loggers, callbacks, max_steps=3):
    trainer = pl.Trainer(max_steps=max_steps, logger=loggers, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(small_gpt(), small_data())
    return trainer


def test_wandb_offline_run_records_the_same_keys_as_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="llmdbg-test")
    trainer = _fit(tmp_path, [tb, wb], [GradientMonitor(every_n_steps=1, histograms=True, histogram_bins=8)])
    Writers.for_trainer(trainer).alert("grad spike in block_1", "grad norm 40x its baseline", step=2, level="ERROR")
    run_file = wb.experiment.settings.sync_file
    wb.experiment.finish()
    run = read_finished_run(run_file)

    events = read_events(tb.log_dir)
    tb_tags = {t for t in events.Tags()["scalars"] if t.startswith("llmdbg/")}
    rows = [r for r in run["history"] if any(k.startswith("llmdbg/grad_norm/") for k in r)]
    assert len(rows) == 3
    for row in rows:
        step = row["trainer/global_step"]
        assert {k for k in row if k.startswith("llmdbg/") and not k.startswith("llmdbg/grad_hist/")} == tb_tags
        for tag in tb_tags:
            assert row[tag] == pytest.approx(scalars(events, tag)[step], rel=1e-6), tag

    hist_rows = [r for r in run["history"] if "llmdbg/grad_hist/block_0" in r]
    assert len(hist_rows) == 3
    hist = hist_rows[0]["llmdbg/grad_hist/block_0"]
    assert hist["_type"] == "histogram" and len(hist["values"]) == 8 and len(hist["bins"]) == 9
    tb_hist = events.Histograms("llmdbg/grad_hist/block_0")[0].histogram_value
    assert sum(hist["values"]) == tb_hist.num

    assert run["alerts"] == [
        {"title": "grad spike in block_1", "text": "grad norm 40x its baseline", "level": "ERROR", "wait_duration": 300000}
    ]


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(ImportError, match=r'pip install "lightning-llmdbg\[wandb\]"'):
        import_wandb()


def test_nonfinite_values_never_reach_a_histogram(tmp_path, caplog):
    class InjectInf(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.model.lm_head.weight.grad.view(-1)[:5] = float("inf")

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    with caplog.at_level(logging.WARNING, logger="lightning_llmdbg"), pytest.warns(UserWarning, match="non-finite"):
        _fit(tmp_path, [tb], [InjectInf(), GradientMonitor(every_n_steps=1, histograms=True)], max_steps=1)
    head = small_gpt().model.lm_head.weight
    hist = read_events(tb.log_dir).Histograms("llmdbg/grad_hist/head")[0].histogram_value
    assert hist.num == head.numel() - 5
    assert any("5 non-finite values left out" in r.getMessage() for r in caplog.records)


def test_every_logger_gets_scalars(tmp_path):
    csv = CSVLogger(str(tmp_path), name="csv")
    _fit(tmp_path, [csv], [GradientMonitor(every_n_steps=1)], max_steps=2)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "llmdbg/grad_norm/total" in header and "llmdbg/grad_norm/block_2" in header


def test_tensorboard_scalars_of_a_step_read_back_as_log_metrics_writes_them(tmp_path):
    """One event per step, yet the same tags, steps and values that Lightning's ``log_metrics`` writes, prefix included."""
    ours, lightnings = TensorBoardLogger(str(tmp_path), name="ours", prefix="run"), TensorBoardLogger(str(tmp_path), name="lightning", prefix="run")
    view = _TrainerView(True, [ours])
    writers = Writers(view)
    for step in range(3):
        metrics = {f"llmdbg/act/block_{i}/rms": 0.5 * i + step for i in range(4)} | {"llmdbg/nan": float("nan")}
        writers.scalars(metrics, step)
        lightnings.log_metrics(metrics, step)
    writers.flush()
    lightnings.experiment.flush()
    expected, logged = read_events(lightnings.log_dir), read_events(ours.log_dir)
    assert sorted(logged.Tags()["scalars"]) == sorted(expected.Tags()["scalars"]) and "run-llmdbg/act/block_3/rms" in expected.Tags()["scalars"]
    for tag in expected.Tags()["scalars"]:
        assert [(e.step, str(e.value)) for e in logged.Scalars(tag)] == [(e.step, str(e.value)) for e in expected.Scalars(tag)], tag


def test_only_rank_zero_writes(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    not_zero = _TrainerView(False, [tb])  # Writers holds its trainer weakly: keep it alive here
    writers = Writers(not_zero)
    writers.scalars({"llmdbg/x": 1.0}, step=0)
    writers.text("llmdbg/t", "hello", step=0)
    writers.histogram("llmdbg/h", Histogram([1.0], [0.0, 1.0], 0.0, 1.0, 1.0, 0.5, 0.25, 0), step=0)
    writers.alert("title", "text", step=0)
    assert not (tmp_path / "tb").exists()


def test_custom_scalar_layouts_are_merged(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    view = _TrainerView(True, [tb])  # Writers holds its trainer weakly: keep it alive here
    writers = Writers(view)
    writers.custom_scalars("llmdbg: gradients", {"grad": ["llmdbg/grad_norm/.*"]})
    writers.custom_scalars("llmdbg: activations", {"act": ["llmdbg/act/.*/rms"]})
    writers.custom_scalars(HEALTH_CATEGORY, {"grad norm by block": ["llmdbg/grad_norm/.*"]})
    writers.custom_scalars(HEALTH_CATEGORY, {"activation RMS": ["llmdbg/act/.*/rms$"]})
    writers.flush()
    layout = layout_pb2.Layout()
    layout.ParseFromString(read_events(tb.log_dir).Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == [HEALTH_CATEGORY, "llmdbg: gradients", "llmdbg: activations"]
    assert [c.title for c in layout.category[0].chart] == ["grad norm by block", "activation RMS"]


def test_tables_and_text_reach_tensorboard(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    view = _TrainerView(True, [tb])  # Writers holds its trainer weakly: keep it alive here
    writers = Writers(view)
    writers.table("llmdbg/hard_examples", ["step", "text"], [[3, "a|b"]], step=3)
    writers.flush()
    tensor = read_events(tb.log_dir).Tensors("llmdbg/hard_examples/text_summary")[0]
    text = tensor.tensor_proto.string_val[0].decode()
    assert "| step | text |" in text and "a\\|b" in text


def test_bad_alert_level_names_the_value(tmp_path):
    view = _TrainerView(True, [TensorBoardLogger(str(tmp_path), name="tb")])
    writers = Writers(view)
    with pytest.raises(ValueError, match="'WARNING'"):
        writers.alert("title", "text", step=0, level="WARNING")


def test_writers_do_not_keep_a_trainer_alive(tmp_path):
    import gc
    import weakref

    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[GradientMonitor()], **trainer_kwargs())
    trainer.fit(small_gpt(), small_data())
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert ref() is None
