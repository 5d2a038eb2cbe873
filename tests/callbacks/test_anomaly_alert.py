import json
import logging
import math
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.plugins import MixedPrecision

from lightning_llmdbg import (
    AnomalyAlert,
    GradientMonitor,
    TrainingAnomalyError,
    load_anomaly_bundle,
)
from lightning_llmdbg.testing import TinyGPTModule
from lightning_llmdbg.testing.wandb_records import read_finished_run
from tests.helpers import read_events, run_script, scalars, small_data, small_gpt, trainer_kwargs

NAN_PARAM = "model.transformer.h.1.mlp.c_fc.weight"


class NaNGradient(pl.Callback):
    """NaN in one parameter's gradient at the given steps (listed before the debugger: it sees the fault)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            pl_module.model.transformer.h[1].mlp.c_fc.weight.grad.view(-1)[:3] = float("nan")


class InfLossGPT(TinyGPTModule):
    """The reference GPT whose loss is Inf at one step."""

    inf_step = -1

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.inf_step:
            out["loss"] = out["loss"] * float("inf")
        return out


def inf_loss_gpt(step):
    model = small_gpt()
    model.__class__ = InfLossGPT
    model.inf_step = step
    return model


class RandomTokens(pl.Callback):
    """A batch of random tokens with shuffled targets at one step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            generator = torch.Generator().manual_seed(self.step)
            batch["input_ids"].copy_(torch.randint(0, 256, batch["input_ids"].shape, generator=generator))
            batch["labels"].copy_(batch["input_ids"].flatten()[torch.randperm(batch["labels"].numel(), generator=generator)].view_as(batch["labels"]))


def _fit(tmp_path, callbacks, max_steps=8, model=None, loggers=None, ckpt_path=None, **kwargs):
    loggers = loggers if loggers is not None else [TensorBoardLogger(str(tmp_path), name="tb")]
    trainer = pl.Trainer(max_steps=max_steps, logger=loggers, callbacks=callbacks, **trainer_kwargs(**kwargs))
    trainer.fit(model or small_gpt(), small_data(train_samples=2048), ckpt_path=ckpt_path)
    return trainer


def test_wandb_alert_records_title_level_and_rate_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="llmdbg-test")
    seen = []
    alert = AnomalyAlert(action="skip", wait_duration=600, on_anomaly=seen.append)
    trainer = _fit(tmp_path, [NaNGradient([2, 4, 5]), alert], loggers=[tb, wb], model=inf_loss_gpt(6))
    run_file = wb.experiment.settings.sync_file
    wb.experiment.finish()
    run = read_finished_run(run_file)

    # Three NaN-gradient steps and one Inf loss: four anomalies, but the repeated title alerts once in 600 s.
    assert [(a.step, a.rule, a.group) for a in seen] == [
        (2, "nonfinite", "block_1"), (4, "nonfinite", "block_1"), (5, "nonfinite", "block_1"), (6, "nonfinite", "loss")
    ]
    assert [(a["title"], a["level"], a["wait_duration"]) for a in run["alerts"]] == [
        ("llmdbg nonfinite: block_1", "ERROR", 600_000),
        ("llmdbg nonfinite: loss", "ERROR", 600_000),
    ]
    assert NAN_PARAM in run["alerts"][0]["text"] and "step 2" in run["alerts"][0]["text"]

    events = read_events(tb.log_dir)
    assert scalars(events, "llmdbg/alerts/count") == {2: 1.0, 4: 2.0, 5: 3.0, 6: 4.0}
    texts = events.Tensors("llmdbg/alerts/text_summary")
    assert [t.step for t in texts] == [2, 6]
    assert trainer.progress_bar_metrics["llmdbg/alerts"] == 4.0
    assert alert.alerts_total == 4


def test_clean_run_alerts_nothing(tmp_path):
    seen = []
    trainer = _fit(tmp_path, [GradientMonitor(every_n_steps=5), AnomalyAlert(on_anomaly=seen.append)], max_steps=120)
    assert seen == [] and "llmdbg/alerts" not in trainer.progress_bar_metrics
    assert not os.path.exists(os.path.join(trainer.log_dir, "llmdbg", "anomalies"))


@pytest.mark.parametrize("order", ["alert_first", "alert_last"])
def test_skip_leaves_parameters_and_optimizer_state_untouched(tmp_path, order):
    bad = 5
    snapshots = {}
    losses = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == bad:
                opt = trainer.optimizers[0]
                snapshots["before"] = (
                    {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                    {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]},
                )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])
            if trainer.global_step - 1 == bad:
                opt = trainer.optimizers[0]
                snapshots["after"] = (
                    {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                    {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]},
                )

    alert = AnomalyAlert(action="skip")
    monitor = GradientMonitor(every_n_steps=1)
    debuggers = [alert, monitor] if order == "alert_first" else [monitor, alert]
    _fit(tmp_path, [Record(), NaNGradient([bad]), *debuggers], max_steps=12)

    params_before, state_before = snapshots["before"]
    params_after, state_after = snapshots["after"]
    for name, value in params_before.items():
        assert torch.equal(value, params_after[name]), name
    for key, state in state_before.items():
        for k, v in state.items():
            assert torch.equal(v, state_after[key][k]), k  # moments and AdamW's step count alike
    assert alert.skipped_steps_total == 1 and alert.alerts_total == 1
    assert all(math.isfinite(losses[s]) for s in range(bad + 1, 12)) and len(losses) == 12
    assert losses[11] < losses[0]  # and it kept learning


def test_stop_ends_the_run_cleanly_after_the_bad_step(tmp_path):
    trainer = _fit(tmp_path, [NaNGradient([3]), AnomalyAlert(action="stop")], max_steps=20)
    assert trainer.global_step == 4 and trainer.state.status == "finished"
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())  # the bad step was not applied


def test_raise_names_rule_signal_group_step_and_value(tmp_path):
    with pytest.raises(TrainingAnomalyError, match=r"nonfinite on block_1 \(signal llmdbg/grad_nonfinite/block_1\) at step 3: value 3") as err:
        _fit(tmp_path, [NaNGradient([3]), AnomalyAlert(action="raise")], max_steps=20)
    assert err.value.anomaly.step == 3


def test_reproduction_bundle_holds_the_batch_rng_and_history(tmp_path):
    seen_batches = {}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_batches.setdefault(trainer.global_step, []).append(batch["input_ids"].clone())

    callbacks = [RandomTokens(150), Keep(), GradientMonitor(every_n_steps=25), AnomalyAlert()]
    trainer = _fit(tmp_path, callbacks, max_steps=151, accumulate_grad_batches=2)
    path = os.path.join(trainer.log_dir, "llmdbg", "anomalies", "step_150.pt")
    assert os.listdir(os.path.dirname(path)) == ["step_150.pt"]
    bundle = load_anomaly_bundle(path)
    assert bundle["step"] == 150 and bundle["rank"] == 0
    assert bundle["anomalies"][0]["rule"] == "spike" and bundle["anomalies"][0]["signal"] == "loss"
    assert len(bundle["batches"]) == 2  # both micro-batches of the step
    assert all(torch.equal(b["input_ids"], seen) for b, seen in zip(bundle["batches"], seen_batches[150]))
    assert bundle["rng"]["torch"].dtype == torch.uint8 and bundle["rng"]["numpy"]["keys"].numel() == 624
    assert len(bundle["history"]["loss"]) == 128 and "llmdbg/grad_norm/total" in bundle["history"]
    assert torch.load(path, weights_only=True)["step"] == 150


def test_resume_keeps_baselines_and_does_not_alert_again(tmp_path):
    seen = []
    first = AnomalyAlert(action="skip", on_anomaly=seen.append)
    trainer = _fit(tmp_path, [NaNGradient([20]), GradientMonitor(every_n_steps=5), first], max_steps=140)
    ckpt = str(tmp_path / "after_warmup.ckpt")
    trainer.save_checkpoint(ckpt)
    assert [(a.step, a.rule) for a in seen] == [(20, "nonfinite")]

    # Two steps after resuming, a loss spike is caught: only because the loss baseline came back (warm-up: 16 values).
    resumed_seen = []
    resumed = AnomalyAlert(action="skip", on_anomaly=resumed_seen.append)
    _fit(tmp_path, [RandomTokens(142), GradientMonitor(every_n_steps=5), resumed], max_steps=146, ckpt_path=ckpt)
    assert [(a.step, a.rule, a.group) for a in resumed_seen] == [(142, "spike", "loss")]  # nothing from before
    assert resumed.alerts_total == 2 and resumed.skipped_steps_total == 2  # counts carry on
    assert len(resumed.history.get("loss")) == 128

    class Forgetful(AnomalyAlert):  # the control: the same resume without the callback's state
        def load_state_dict(self, state_dict):
            pass

    forgetful_seen = []
    _fit(tmp_path, [RandomTokens(142), Forgetful(on_anomaly=forgetful_seen.append)], max_steps=146, ckpt_path=ckpt)
    assert forgetful_seen == []


def test_grad_scaler_overflow_is_info_not_an_alert(tmp_path, caplog):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow until the scale backs off
    alert = AnomalyAlert()
    with caplog.at_level(logging.INFO, logger="lightning_llmdbg"):
        _fit(tmp_path, [alert], max_steps=14, model=inf_loss_gpt(12), plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    overflow_logs = [r for r in caplog.records if "GradScaler found non-finite gradients" in r.getMessage()]
    assert alert.scaler_overflows >= 3 and len(overflow_logs) == alert.scaler_overflows
    assert all(r.levelno == logging.INFO for r in overflow_logs)
    assert alert.alerts_total == 1  # only the real fault: an Inf loss
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("llmdbg nonfinite: loss (step 12)")


class FusedAdamGPT(InfLossGPT):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


def test_skip_under_a_grad_scaler_with_a_fused_optimizer_keeps_the_run_going(tmp_path):
    """Lightning leaves unscaling of fused optimizers to `scaler.step`: a skipped step must still record its inf check."""
    model = inf_loss_gpt(3)
    model.__class__ = FusedAdamGPT
    alert = AnomalyAlert(action="skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = _fit(tmp_path, [alert], max_steps=6, model=model, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == 6 and alert.skipped_steps_total == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_subscription_outlives_a_failed_fit(tmp_path):
    monitor = GradientMonitor(every_n_steps=1)
    with pytest.raises(TrainingAnomalyError):
        _fit(tmp_path, [NaNGradient([2]), monitor, AnomalyAlert(action="raise")], max_steps=5)
    assert monitor._signal_listeners == []


DDP_SCRIPT = Path(__file__).parents[1] / "scripts" / "anomaly_ddp.py"


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_ddp_fault_on_one_rank_is_acted_on_by_both(action, tmp_path, timeout=180):
    run_script(DDP_SCRIPT, action, tmp_path, timeout=timeout)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["alerts"] == ranks[1]["alerts"] == 1
    assert all(r["finite"] for r in ranks)  # the NaN never reached a weight
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # both ranks acted alike: the replicas are still equal
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    if action == "skip":
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    else:
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4  # stopped after the bad step, together


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"action": "ignore"}, r"`action`.*'ignore'"),
        ({"rules": "strict"}, r"`rules`.*'strict'"),
        ({"rules": []}, r"`rules`.*\[\]"),
        ({"wait_duration": -1}, r"`wait_duration`.*-1"),
        ({"max_bundles": 1.5}, r"`max_bundles`.*1\.5"),
        ({"on_anomaly": "print"}, r"`on_anomaly`.*'print'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnomalyAlert(**kwargs)
