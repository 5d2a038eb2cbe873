"""Bad input never costs the run: each case gives a clear error at setup (before any step), or a warning or an
alert while training goes on to its last step. The README's table "What happens with bad input" lists them."""

import csv
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_llmdbg import ActivationProbe, GradientMonitor, LLMDebugger
from lightning_llmdbg.testing import TinyGPTModule
from lightning_llmdbg.writers import import_wandb
from tests.helpers import count_hooks, read_events, scalars, small_data, small_gpt, trainer_kwargs

STEPS = 6
FAULT_AT = 3


def every_step(**alerts):
    every = {"every_n_steps": 1}
    return LLMDebugger(
        gradients={**every, "warmup_steps": 0}, activations={**every, "gradients": True}, examples={**every, "k": 2},
        alerts=alerts,
    )


def fit(model, data, callbacks, tmp_path=None, loggers=None):
    if loggers is None:
        loggers = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(max_steps=STEPS, logger=loggers, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, data)
    return trainer


def alerts_of(trainer):
    return read_events(trainer.logger.log_dir).Tensors("llmdbg/alerts/text_summary")


# -- non-finite values: reported by name and step, training goes on ------------------------------------------------------
class Faulty(TinyGPTModule):
    def __init__(self, config, fault):
        super().__init__(config)
        self.fault = fault
        if fault == "activation":
            self.model.transformer.h[1].register_forward_hook(self._inf_at_fault)

    def _inf_at_fault(self, module, args, output):
        if self.trainer.global_step == FAULT_AT:
            output = output.clone()
            output[0, 0, 0] = float("inf")
            return output

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.fault == "loss" and self.trainer.global_step == FAULT_AT:
            out["loss"] = out["loss"] * float("nan")
        return out

    def on_after_backward(self):
        if self.fault == "gradient" and self.trainer.global_step == FAULT_AT:
            self.model.transformer.h[1].mlp.c_fc.weight.grad.view(-1)[:3] = float("nan")


@pytest.mark.parametrize("fault", ["loss", "gradient", "activation"])
def test_a_non_finite_loss_gradient_or_activation_is_alerted_and_training_goes_on(tmp_path, fault):
    model = Faulty(small_gpt().config, fault)
    hooks_before = count_hooks(model)  # the fault's own hook
    seen = []
    trainer = fit(model, small_data(), [every_step(action="skip", on_anomaly=seen.append)], tmp_path)
    assert trainer.global_step == STEPS
    assert {a.step for a in seen} == {FAULT_AT} and all(a.rule == "nonfinite" for a in seen)
    if fault == "gradient":
        assert any(a.group == "block_1" for a in seen)
    assert [e.step for e in alerts_of(trainer)] == [FAULT_AT]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the step was skipped
    events = read_events(trainer.logger.log_dir)
    if fault == "activation":  # the statistics show where: block 1 is non-finite at that step, block 0 is not
        assert not torch.isfinite(torch.tensor(scalars(events, "llmdbg/act/block_1/absmax")[FAULT_AT]))
        assert torch.isfinite(torch.tensor(scalars(events, "llmdbg/act/block_0/absmax")[FAULT_AT]))
    assert count_hooks(model) == hooks_before


class Regressor(pl.LightningModule):
    """No transformer blocks: two named linear layers on float features."""

    def __init__(self, nan_input_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)
        self.nan_input_at = nan_input_at

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step == self.nan_input_at:
            x = x.clone()
            x[0, 0] = float("nan")
        per_example = F.mse_loss(self(x).squeeze(-1), y, reduction="none")
        return {"loss": per_example.mean(), "per_example_loss": per_example.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def regression_data(batches=STEPS):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batches, 8, generator=g)
    return DataLoader(list(zip(x, x.sum(dim=1))), batch_size=4)


def test_a_nan_input_is_alerted_and_training_goes_on(tmp_path):
    seen = []
    callbacks = [GradientMonitor(every_n_steps=1), LLMDebugger(gradients=False, activations=False, examples=False,
                                                                 alerts={"action": "skip", "on_anomaly": seen.append})]
    trainer = fit(Regressor(nan_input_at=FAULT_AT), regression_data(), callbacks, tmp_path)
    assert trainer.global_step == STEPS
    assert {a.step for a in seen} == {FAULT_AT} and {a.rule for a in seen} == {"nonfinite"}


# -- batches -------------------------------------------------------------------------------------------------------------
class CopesWithEmptyBatches(TinyGPTModule):
    def __init__(self, config, skip_empty):
        super().__init__(config)
        self.skip_empty = skip_empty

    def training_step(self, batch, batch_idx):
        if batch["input_ids"].shape[0] == 0:
            if self.skip_empty:
                return None
            return {"loss": self(batch["input_ids"]).sum() * 0.0, "per_example_loss": torch.zeros(0)}
        return super().training_step(batch, batch_idx)


def batches_with_an_empty_one():
    data = small_data()
    data.setup("fit")
    batches = [b for _, b in zip(range(STEPS), data.train_dataloader())]
    batches[FAULT_AT] = {k: v[:0] for k, v in batches[FAULT_AT].items()}
    return DataLoader(batches, batch_size=None)


@pytest.mark.parametrize("skip_empty", [False, True], ids=["zero-loss", "returns-None"])
def test_an_empty_batch_neither_crashes_nor_reports_made_up_statistics(tmp_path, skip_empty):
    model = CopesWithEmptyBatches(small_gpt().config, skip_empty)
    seen = []
    trainer = fit(model, batches_with_an_empty_one(), [every_step(on_anomaly=seen.append)], tmp_path)
    assert trainer.global_step == STEPS
    events = read_events(trainer.logger.log_dir)
    # No activation ran at the empty step: nothing is reported for it, rather than zeros or NaN.
    assert FAULT_AT not in scalars(events, "llmdbg/act/block_0/rms")
    assert sorted(scalars(events, "llmdbg/act/block_0/rms")) == [s for s in range(STEPS) if s != FAULT_AT]
    if skip_empty:  # no backward ran: no gradient norm for that step, and so no "vanishing gradient" alert
        assert FAULT_AT not in scalars(events, "llmdbg/grad_norm/total")
        assert seen == []
    assert count_hooks(model) == 0


class TupleBatches(TinyGPTModule):
    def training_step(self, batch, batch_idx):
        input_ids, labels, _ = batch
        return super().training_step({"input_ids": input_ids, "labels": labels}, batch_idx)


def test_a_batch_of_another_structure_is_ranked_without_text(tmp_path):
    data = small_data()
    data.setup("fit")
    batches = [(b["input_ids"], b["labels"], [f"doc-{i}"] * 4) for i, b in zip(range(STEPS), data.train_dataloader())]
    debugger = every_step()
    trainer = fit(TupleBatches(small_gpt().config), DataLoader(batches, batch_size=None), [debugger], tmp_path)
    assert trainer.global_step == STEPS and debugger.examples.samples_taken == STEPS
    rows = debugger.examples.last_logged
    assert rows and all({"loss", "step"} <= set(row) and "text" not in row for row in rows)


# -- models and patterns: clear errors at setup ----------------------------------------------------------------------------
def test_a_model_without_transformer_blocks_gets_an_error_at_setup_that_says_what_to_pass(tmp_path):
    trainer = pl.Trainer(max_steps=STEPS, logger=False, callbacks=[LLMDebugger()], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"part 'activations'.*No transformer blocks.*modules=.*'fc1'.*activations=False"):
        trainer.fit(Regressor(), regression_data())
    assert trainer.global_step == 0
    # Without the probe the rest works on it: gradient groups are its top-level modules.
    trainer = fit(Regressor(), regression_data(), [LLMDebugger(activations=False)], tmp_path)
    assert {"llmdbg/grad_norm/fc1", "llmdbg/grad_norm/fc2"} <= set(read_events(trainer.logger.log_dir).Tags()["scalars"])


@pytest.mark.parametrize(
    "callback, match",
    [
        (ActivationProbe(modules=["model.nomatch.*"]), r"ActivationProbe\(modules=.*'model.nomatch.\*' matches nothing.*'model.transformer"),
        (GradientMonitor(groups={"x": "nomatch.*"}), r"GradientMonitor\(groups=.*'nomatch.\*' matches nothing.*'model.transformer"),
    ],
)
def test_a_pattern_that_matches_nothing_fails_at_setup_naming_it_and_the_closest_names(callback, match):
    trainer = pl.Trainer(max_steps=STEPS, logger=False, callbacks=[callback], **trainer_kwargs())
    with pytest.raises(ValueError, match=match):
        trainer.fit(small_gpt(), small_data())
    assert trainer.global_step == 0


# -- missing dependencies and loggers ------------------------------------------------------------------------------------
def test_without_wandb_everything_but_wandb_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "lightning-llmdbg\[wandb\]"'):
        import_wandb()
    model = Faulty(small_gpt().config, "gradient")
    trainer = fit(model, small_data(), [every_step(action="skip")], tmp_path)
    assert trainer.global_step == STEPS and [e.step for e in alerts_of(trainer)] == [FAULT_AT]


def test_no_logger_warns_once_and_training_goes_on():
    with pytest.warns(UserWarning, match="no logger") as warned:
        trainer = fit(small_gpt(), small_data(), [every_step()], loggers=False)
    assert trainer.global_step == STEPS
    assert sum("no logger" in str(w.message) for w in warned) == 1


def test_a_csv_logger_alone_gets_the_scalars_and_a_warning_for_the_rest(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    with pytest.warns(UserWarning, match=r"loggers \(CSVLogger\) take scalars only.*TensorBoardLogger") as warned:
        trainer = fit(small_gpt(), small_data(), [every_step()], loggers=logger)
    assert trainer.global_step == STEPS
    assert sum("take scalars only" in str(w.message) for w in warned) == 1
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]) for r in rows if r.get("llmdbg/grad_norm/total")}
    assert logged == set(range(STEPS))
