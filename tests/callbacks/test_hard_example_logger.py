import html
import json
import re
from html.parser import HTMLParser

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader

from lightning_llmdbg import HardExampleLogger
from lightning_llmdbg.testing import TinyGPTModule
from lightning_llmdbg.testing.wandb_records import read_finished_run
from tests.helpers import read_events, small_data, small_gpt, trainer_kwargs

TAG = "llmdbg/hard_examples"


class RecordLosses(pl.Callback):
    """Each batch's per-example losses, ids and step, as the training step returned them (placed before the logger)."""

    def __init__(self, losses=None):
        self.losses = losses or (lambda outputs, batch: outputs["per_example_loss"])
        self.seen = []  # (step, id, loss, loss above the batch's mean)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the optimizer step this batch belonged to (it has been taken)
        losses = self.losses(outputs, batch).tolist()
        mean = sum(losses) / len(losses)
        for i, loss in zip(batch["example_id"].tolist(), losses):
            self.seen.append((step, i, loss, loss - mean))


def expected_tables(seen, k, logged_steps):
    """Per logged step: the window's k hardest since the previous log, and the run's k hardest examples so far (by
    loss above their batch's mean)."""
    out, previous = {}, -1
    for step in logged_steps:
        window = sorted((r for r in seen if previous < r[0] <= step), key=lambda r: -r[2])[:k]
        run, ids = [], set()
        for r in sorted((r for r in seen if r[0] <= step), key=lambda r: -r[3]):
            if r[1] not in ids:  # each example once, at its hardest presentation
                ids.add(r[1])
                run.append(r)
        run = run[:k]
        out[step] = {"window": window, "run": run}
        previous = step
    return out


def markdown_rows(text):
    lines = text.splitlines()
    columns = [c.strip() for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]
    return [dict(zip(columns, (c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]))) for line in lines[2:]]


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def html_text(markup):
    parser = _Text()
    parser.feed(markup)
    return "".join(parser.parts)


# -- must-show 3: the callback's own per-example losses for Hugging Face causal-LM batches -----------------------------
class HFCausalLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        self.model = GPT2LMHeadModel(config)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _hf_batches(n=24, T=12):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        ids = torch.randint(0, 64, (T,), generator=g)
        labels = ids.clone()
        labels[: i % 5] = -100  # an unscored prompt of varying length
        items.append({"input_ids": ids, "labels": labels, "example_id": torch.tensor(i)})
    return DataLoader(items, batch_size=4)


def test_causal_lm_losses_computed_by_the_callback_equal_cross_entropy_by_hand(tmp_path):
    def by_hand(outputs, batch):
        logits, labels = outputs["logits"], batch["labels"]
        losses = []
        for b in range(labels.shape[0]):
            token = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="none")
            losses.append(token.sum() / (labels[b, 1:] != -100).sum())
        return torch.stack(losses)

    record = RecordLosses(by_hand)
    logger = HardExampleLogger(k=5, every_n_steps=3)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=6, logger=False, callbacks=[record, logger], **trainer_kwargs())
    trainer.fit(HFCausalLM(), _hf_batches())
    assert logger._shift is True  # labels equal to the inputs: shifted, as the model itself does
    expected = expected_tables(record.seen, 5, [3, 5])[5]
    for scope in ("window", "run"):
        rows = [r for r in logger.last_logged if r["scope"] == scope]
        assert [(r["step"], r["id"]) for r in rows] == [(s, i) for s, i, *_ in expected[scope]], scope
        for row, (_, _, loss, _) in zip(rows, expected[scope]):
            assert row["loss"] == pytest.approx(loss, rel=1e-6)
    window = [r for r in logger.last_logged if r["scope"] == "window"]
    assert all(r["saliency"] and r["hardest tokens"] for r in window)  # get_input_embeddings() was found


# -- must-show 4: tables read back from TensorBoard and W&B, redaction ----------------------------------------------------
def test_tables_in_tensorboard_and_wandb_hold_the_top_k_and_redact_is_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    redacted = []

    def redact(text):
        redacted.append(text)
        return re.sub("[a-z]", "x", text)

    record = RecordLosses()
    logger = HardExampleLogger(k=3, every_n_steps=2, redact=redact)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="llmdbg-test")
    trainer = pl.Trainer(max_steps=5, logger=[tb, wb], callbacks=[record, logger], **trainer_kwargs())
    trainer.fit(small_gpt(), small_data())
    run_file = wb.experiment.settings.sync_file
    wb.experiment.finish()
    run = read_finished_run(run_file)
    expected = expected_tables(record.seen, 3, [0, 2, 4])
    assert redacted and any(re.search("[a-z]", t) for t in redacted)  # it saw the real text

    texts = read_events(tb.log_dir).Tensors(f"{TAG}/text_summary")
    assert [t.step for t in texts] == [0, 2, 4]
    for event in texts:
        rows = markdown_rows(event.tensor_proto.string_val[0].decode())
        want = [("window", r) for r in expected[event.step]["window"]] + [("run", r) for r in expected[event.step]["run"]]
        assert [(r["scope"], int(r["step"]), int(r["id"])) for r in rows] == [(s, r[0], r[1]) for s, r in want]
        for row, (_, (_, _, loss, excess)) in zip(rows, want):
            assert float(row["excess"]) == pytest.approx(excess, abs=1e-4)
            assert float(row["loss"]) == pytest.approx(loss, rel=1e-5)
            assert float(row["perplexity"]) == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
            for column in ("text", "hardest tokens", "saliency"):
                assert not re.search("[a-wyz]", html.unescape(row[column])), (column, row[column])
            assert "x" in row["text"] and row["saliency"]

    tables = [a for a in run["artifacts"] if f"{TAG}.table.json" in a["files"]]
    assert len(tables) == 3
    for artifact, step in zip(tables, [0, 2, 4]):
        with open(artifact["files"][f"{TAG}.table.json"]) as f:
            table = json.load(f)
        assert table["columns"] == ["scope", "#", "step", "loss", "excess", "perplexity", "id", "text", "hardest tokens", "saliency"]
        got = [(r[0], r[2], r[6], r[3]) for r in table["data"]]
        want = [("window", *r) for r in expected[step]["window"]] + [("run", *r) for r in expected[step]["run"]]
        assert [g[:3] for g in got] == [w[:3] for w in want]
        assert [g[3] for g in got] == pytest.approx([w[3] for w in want], rel=1e-5)
        for row in table["data"]:
            cell = row[7]
            assert cell["_type"] == "html-file"
            with open(artifact["files"][cell["path"]]) as f:
                markup = f.read()
            assert "<span" in markup and not re.search("[a-wyz]", html_text(markup))
    rows = [r for r in run["history"] if TAG in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2, 4]


def test_log_text_false_logs_ids_and_numbers_only(tmp_path):
    logger = HardExampleLogger(k=2, every_n_steps=1, log_text=False)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    pl.Trainer(max_steps=1, logger=tb, callbacks=[logger], **trainer_kwargs()).fit(small_gpt(), small_data())
    text = read_events(tb.log_dir).Tensors(f"{TAG}/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = markdown_rows(text)
    assert list(rows[0]) == ["scope", "#", "step", "loss", "excess", "perplexity", "id", "hardest tokens", "saliency"]
    for row in rows:  # positions and numbers: "@12 5.61; @3 5.58"
        assert re.fullmatch(r"(@\d+ -?[\d.e-]+(; )?)+", row["hardest tokens"]), row
        assert re.fullmatch(r"(@\d+ -?[\d.e-]+(; )?)+", row["saliency"]), row


# -- must-show 5: attribution leaves parameters, gradients and optimizer state untouched -------------------------------
class CheckGradsUntouched(pl.Callback):
    def __init__(self, before: bool, shared: dict):
        self.before, self.shared = before, shared

    def on_train_batch_end(self, trainer, pl_module, *args):
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        if self.before:
            self.shared["grads"] = grads
        else:
            assert grads.keys() == self.shared["grads"].keys() and grads
            assert all(torch.equal(grads[n], self.shared["grads"][n]) for n in grads)
            self.shared["checked"] = self.shared.get("checked", 0) + 1


def _fit_state(callbacks, steps=4):
    model = small_gpt(dropout=0.1)  # dropout draws random numbers: attribution must not shift them
    trainer = pl.Trainer(max_steps=steps, logger=False, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, small_data())
    return model, trainer.optimizers[0].state_dict()


def test_attribution_leaves_parameters_and_optimizer_state_as_without_it():
    shared = {}
    logger = HardExampleLogger(k=4, every_n_steps=1)
    with_attr, opt_with = _fit_state([CheckGradsUntouched(True, shared), logger, CheckGradsUntouched(False, shared)])
    without, opt_without = _fit_state([])
    assert shared["checked"] == 4
    assert all(r["saliency"] for r in logger.last_logged if r["scope"] == "window")  # attribution ran
    for (name, a), (_, b) in zip(with_attr.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name
    for i, state in opt_without["state"].items():
        for key, value in state.items():
            assert torch.equal(opt_with["state"][i][key], value), (i, key)


# -- checkpoint / resume ----------------------------------------------------------------------------------------------------
def test_resume_keeps_the_window_the_run_rows_and_the_dynamics(tmp_path):
    def fit(name, callbacks=(), ckpt=None, **limits):
        logger = HardExampleLogger(k=16, every_n_steps=4, dynamics=True)
        tb = TensorBoardLogger(str(tmp_path), name=name)
        checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
        trainer = pl.Trainer(logger=tb, callbacks=[*callbacks, logger], **limits, **trainer_kwargs(enable_checkpointing=checkpointing))
        trainer.fit(small_gpt(), small_data(train_samples=24), ckpt_path=ckpt)
        texts = {e.step: e.tensor_proto.string_val[0].decode() for e in read_events(tb.log_dir).Tensors(f"{TAG}/text_summary")}
        return logger, texts

    _, whole_texts = fit("whole", max_steps=10)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True)
    # 6 steps: logs at 0 and 4; the checkpoint (at the epoch's end) holds step 5 in the open window, which the end
    # of this fit then logs too.
    first, first_texts = fit("first", [checkpoint], max_epochs=1)
    assert first.last_sampled_step == 5
    record = RecordLosses()
    resumed, resumed_texts = fit("resumed", [record], ckpt=str(next((tmp_path / "ckpt").glob("*.ckpt"))), max_steps=10)
    assert sorted(resumed_texts) == [8, 9]
    window_steps = {int(r["step"]) for r in markdown_rows(resumed_texts[8]) if r["scope"] == "window"}
    assert window_steps == {5, 6, 7, 8}  # k = 16 keeps every row of the window: step 5 came from the checkpoint

    # Lightning replays part of the data after this resume, so the runs differ after the checkpoint; compare what the
    # checkpoint carried: the step-5 rows of the open window, the run rows rendered before it (text, marks and
    # saliency exactly as the first fit logged them at step 4), and the dynamics, which must be the first fit's plus
    # what the resumed fit saw.
    whole_rows, resumed_rows = markdown_rows(whole_texts[8]), markdown_rows(resumed_texts[8])
    carried = lambda rows, scope, last: [r for r in rows if r["scope"] == scope and int(r["step"]) <= last]
    numbers = lambda rows: [(r["step"], r["id"], r["loss"]) for r in rows]
    assert len(carried(resumed_rows, "window", 5)) == 4  # the whole batch of step 5
    assert numbers(carried(resumed_rows, "window", 5)) == numbers(carried(whole_rows, "window", 5))
    unranked = lambda rows: [{c: v for c, v in r.items() if c != "#"} for r in rows]  # positions shift after step 5
    before_checkpoint = unranked(carried(markdown_rows(first_texts[4]), "run", 4))  # the run rows as logged at step 4
    assert carried(resumed_rows, "run", 4) and all(r in before_checkpoint for r in unranked(carried(resumed_rows, "run", 4)))
    before, after = first.dynamics_scores(), resumed.dynamics_scores()
    for j, i in enumerate(after["id"].tolist()):
        k = before["id"].tolist().index(i)
        later = [loss for _, seen_id, loss, _ in record.seen if seen_id == i]
        assert after["presentations"][j] == before["presentations"][k] + len(later)
        total = before["mean_loss"][k] * before["presentations"][k] + sum(later)
        assert after["mean_loss"][j].item() == pytest.approx(total.item() / after["presentations"][j].item(), rel=1e-6)
    assert resumed.samples_taken == 4  # 0 and 4 before the checkpoint, 8 and 9 after: the counters were restored


# -- errors --------------------------------------------------------------------------------------------------------------
class LossOnly(TinyGPTModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def test_no_loss_source_warns_once_what_to_return_and_training_goes_on():
    pl.seed_everything(0, verbose=False)
    logger = HardExampleLogger(every_n_steps=1)
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[logger], **trainer_kwargs())
    with pytest.warns(UserWarning, match=r"'per_example_loss'.*loss_fn.*'logits'.*off for the rest of this run") as seen:
        trainer.fit(LossOnly(small_gpt().config), small_data())
    assert trainer.global_step == 4 and logger.samples_taken == 0
    assert sum("HardExampleLogger" in str(w.message) for w in seen) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "`k`.*0"),
        (dict(every_n_steps=-1), "every_n_steps.*-1"),
        (dict(mark_tokens=0), "mark_tokens.*0"),
        (dict(decode=5), "`decode`.*5"),
        (dict(redact="secret"), "`redact`.*'secret'"),
        (dict(shift_labels="yes"), "shift_labels.*'yes'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardExampleLogger(**kwargs)


def test_per_token_losses_line_up_with_the_tokens_they_score():
    """Position t of a row's per-token losses is the loss of predicting token t (position 0 is never predicted)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    rows = HardExampleLogger(attribution=False)._examples({"loss": torch.tensor(0.0), "logits": logits}, {"input_ids": ids, "labels": labels})["rows"]
    per_token = rows["per_token"]
    assert per_token.shape == ids.shape
    by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 5)
    assert torch.isnan(per_token[:, 0]).all() and torch.isnan(per_token[0, 1:3]).all()  # unscored prompt
    torch.testing.assert_close(per_token[0, 3:], by_hand[0, 2:])
    torch.testing.assert_close(per_token[1, 1:], by_hand[1])


def test_steps_without_losses_are_skipped_not_fatal(tmp_path):
    class SometimesNone(TinyGPTModule):
        def training_step(self, batch, batch_idx):  # None: Lightning skips the step
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    model = small_gpt()
    model.__class__ = SometimesNone
    logger = HardExampleLogger(k=2, every_n_steps=2, attribution=False)
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[logger], **trainer_kwargs())
    trainer.fit(model, small_data())
    assert trainer.global_step == 4 and logger.samples_taken >= 1
