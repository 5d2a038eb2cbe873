import copy
import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision

from lightning_llmdbg import GradientMonitor
from tests.helpers import (
    RecordGradNorms,
    assert_close,
    independent_group_norms,
    read_events,
    reference_group_of,
    scalars,
    small_data,
    small_gpt,
    trainer_kwargs,
)

GROUPS = ["embeddings", "block_0", "block_1", "block_2", "ln_f", "head"]


def _fit(tmp_path, callbacks, max_steps=6, model=None, **kwargs):
    model = model or small_gpt()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=max_steps, logger=logger, callbacks=callbacks, **trainer_kwargs(**kwargs))
    trainer.fit(model, small_data())
    return trainer, read_events(logger.log_dir)


def _assert_norms_match(events, reference, rel=1e-5):
    assert reference, "the reference recorded nothing"
    for group in GROUPS + ["total"]:
        logged = scalars(events, f"llmdbg/grad_norm/{group}")
        assert sorted(logged) == sorted(reference), group
        for step, expected in reference.items():
            assert_close(logged[step], expected[group], rel, f"grad_norm/{group} at step {step}")


def test_group_norms_equal_an_independent_computation(tmp_path):
    reference = RecordGradNorms()
    _, events = _fit(tmp_path, [reference, GradientMonitor(every_n_steps=1)])
    _assert_norms_match(events, reference.by_step)
    assert len(reference.by_step) == 6


def test_absmax_and_param_norm_equal_an_independent_computation(tmp_path):
    seen = {}

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            by_group = {}
            for name, p in pl_module.named_parameters():
                by_group.setdefault(reference_group_of(name), []).append(p)
            seen[trainer.global_step] = {
                g: (torch.cat([p.grad.abs().flatten() for p in ps]).max().item(), torch.cat([p.detach().double().flatten() for p in ps]).norm().item())
                for g, ps in by_group.items()
            }

    _, events = _fit(tmp_path, [Record(), GradientMonitor(every_n_steps=2, warmup_steps=0)], max_steps=5)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for group in GROUPS:
        absmax = scalars(events, f"llmdbg/grad_absmax/{group}")
        param_norm = scalars(events, f"llmdbg/param_norm/{group}")
        assert sorted(absmax) == [0, 2, 4]  # sampled steps only
        for step in absmax:
            assert_close(absmax[step], seen[step][group][0], 1e-6, f"absmax {group}")
            assert_close(param_norm[step], seen[step][group][1], 1e-5, f"param_norm {group}")
        assert scalars(events, f"llmdbg/grad_nonfinite/{group}") == {0: 0.0, 2: 0.0, 4: 0.0}


def test_16_mixed_with_grad_scaler_logs_unscaled_norms(tmp_path):
    reference = RecordGradNorms()
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _, events = _fit(tmp_path, [reference, GradientMonitor(every_n_steps=1)], plugins=[plugin])
    assert scaler.get_scale() >= 2.0**10  # a monitor that read the scaled gradients would be off by this factor
    _assert_norms_match(events, reference.by_step)
    assert all(v["total"] < 100 for v in reference.by_step.values())


def test_accumulated_gradient_is_measured_once_per_optimizer_step(tmp_path):
    model = small_gpt()
    initial = copy.deepcopy(model)
    reference = RecordGradNorms()
    _, events = _fit(tmp_path, [reference, GradientMonitor(every_n_steps=1)], max_steps=3, model=model, accumulate_grad_batches=4)
    _assert_norms_match(events, reference.by_step)
    assert sorted(reference.by_step) == [0, 1, 2]

    # Step 0 by hand: the mean of the first four micro-batches' gradients, each loss divided by 4.
    data = small_data()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    for _ in range(4):
        loss, _ = initial._losses(next(batches))
        (loss / 4).backward()
    by_hand = independent_group_norms(initial)
    logged = {g: scalars(events, f"llmdbg/grad_norm/{g}")[0] for g in GROUPS + ["total"]}
    for group, expected in by_hand.items():
        assert_close(logged[group], expected, 1e-5, f"hand-computed {group}")


def test_update_ratio_is_that_of_the_step_taken(tmp_path):
    lr = 0.05

    class PlainSGD(type(small_gpt())):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    pl.seed_everything(0)
    model = PlainSGD(small_gpt().config)
    _, events = _fit(tmp_path, [GradientMonitor(every_n_steps=2, warmup_steps=0, update_ratio=True)], max_steps=5, model=model)
    # Plain SGD moves W by lr * g, so the ratio must equal lr * |g| / |W| from the same step's logs.
    for group in GROUPS:
        ratio = scalars(events, f"llmdbg/update_ratio/{group}")
        grad = scalars(events, f"llmdbg/grad_norm/{group}")
        weight = scalars(events, f"llmdbg/param_norm/{group}")
        assert sorted(ratio) == [0, 2, 4]
        for step in ratio:
            assert_close(ratio[step], lr * grad[step] / weight[step], 1e-4, f"update_ratio/{group}@{step}")


def test_nonfinite_gradients_are_counted_and_named(tmp_path):
    class InjectNaN(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                grad = pl_module.model.transformer.h[1].mlp.c_fc.weight.grad
                grad.view(-1)[:7] = float("nan")
                grad.view(-1)[7] = float("inf")

    monitor = GradientMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match=r"transformer\.h\.1\.mlp\.c_fc\.weight \(8\)"):
        _, events = _fit(tmp_path, [InjectNaN(), monitor], max_steps=3)
    nonfinite = {g: scalars(events, f"llmdbg/grad_nonfinite/{g}")[2] for g in GROUPS}
    assert nonfinite == {g: (8.0 if g == "block_1" else 0.0) for g in GROUPS}
    assert monitor.latest_signals.step == 2
    assert monitor.latest_signals.details["nonfinite_parameters"] == [("model.transformer.h.1.mlp.c_fc.weight", 8)]
    assert math.isnan(scalars(events, "llmdbg/grad_norm/block_1")[2])
    assert scalars(events, "llmdbg/grad_nonfinite/block_1")[1] == 0.0


def test_histograms_count_every_finite_gradient_value(tmp_path):
    seen = {}

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            blocks = pl_module.model.transformer.h[0]
            seen[trainer.global_step] = torch.cat([p.grad.flatten() for p in blocks.parameters()]).clone()

    _, events = _fit(tmp_path, [Record(), GradientMonitor(every_n_steps=1, histograms=True, histogram_bins=16)], max_steps=2)
    assert set(events.Tags()["histograms"]) == {f"llmdbg/grad_hist/{g}" for g in GROUPS}
    for event in events.Histograms("llmdbg/grad_hist/block_0"):
        values = seen[event.step]
        hist = event.histogram_value
        assert hist.num == values.numel()
        assert_close(hist.min, values.min().item(), 1e-6, "min")
        assert_close(hist.max, values.max().item(), 1e-6, "max")
        expected = torch.histc(values, bins=16, min=values.min().item(), max=values.max().item())
        assert list(hist.bucket) == expected.tolist()


def test_custom_scalars_layout_puts_all_groups_on_one_chart(tmp_path):
    trainer, _ = _fit(tmp_path, [GradientMonitor()], max_steps=1)
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = read_events(trainer.logger.log_dir)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["llmdbg/grad_norm"] == [r"llmdbg/grad_norm/.*"]


def test_param_groups_mode(tmp_path):
    _, events = _fit(tmp_path, [GradientMonitor(groups="param_groups", every_n_steps=1)], max_steps=2)
    tags = {t for t in events.Tags()["scalars"] if t.startswith("llmdbg/grad_norm/")}
    assert tags == {"llmdbg/grad_norm/decay", "llmdbg/grad_norm/no_decay", "llmdbg/grad_norm/total"}
    decay, no_decay, total = (scalars(events, t)[1] for t in sorted(tags))
    assert_close(math.hypot(decay, no_decay), total, 1e-5, "groups add up to the total")


def test_default_schedule_samples_warmup_then_every_n(tmp_path):
    _, events = _fit(tmp_path, [GradientMonitor(every_n_steps=5, warmup_steps=2)], max_steps=12)
    assert sorted(scalars(events, "llmdbg/grad_norm/total")) == [0, 1, 5, 10]


def test_resume_continues_the_schedule(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = GradientMonitor(every_n_steps=4, warmup_steps=0)
    trainer = pl.Trainer(
        max_steps=6, logger=False, callbacks=[first, pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6)],
        **trainer_kwargs(enable_checkpointing=True),
    )
    trainer.fit(small_gpt(), small_data())
    assert (first.samples_taken, first.last_sampled_step) == (2, 4)

    resumed = GradientMonitor(every_n_steps=4, warmup_steps=0)
    logger = TensorBoardLogger(str(tmp_path), name="resumed")
    trainer = pl.Trainer(max_steps=13, logger=logger, callbacks=[resumed], **trainer_kwargs())
    trainer.fit(small_gpt(), small_data(), ckpt_path=str(next(ckpt_dir.glob("*.ckpt"))))
    assert sorted(scalars(read_events(logger.log_dir), "llmdbg/grad_norm/total")) == [8, 12]
    assert (resumed.samples_taken, resumed.last_sampled_step) == (4, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps.*0"),
        (dict(every_n_steps=-5), "every_n_steps.*-5"),
        (dict(warmup_steps=-1), "warmup_steps.*-1"),
        (dict(groups="layers"), "Unknown `groups` mode 'layers'"),
        (dict(histogram_bins=0), "histogram_bins.*0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


def test_glob_matching_nothing_fails_at_setup_naming_it(tmp_path):
    monitor = GradientMonitor(groups={"attn": "*.atn.*"})
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[monitor], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"'\*\.atn\.\*' matches nothing\. Closest parameter names: 'model\.transformer"):
        trainer.fit(small_gpt(), small_data())
    assert trainer.global_step == 0


def test_frozen_parameters_are_skipped_and_said_once(tmp_path, caplog):
    model = small_gpt()
    model.model.transformer.wpe.weight.requires_grad_(False)
    with caplog.at_level(logging.INFO):
        _, events = _fit(tmp_path, [GradientMonitor(every_n_steps=1)], max_steps=2, model=model)
    said = [r.getMessage() for r in caplog.records if "frozen parameters" in r.getMessage()]
    assert len(said) == 1 and "model.transformer.wpe.weight" in said[0]
    # the embeddings group now holds wte alone
    assert scalars(events, "llmdbg/param_norm/embeddings")[0] == pytest.approx(model.model.transformer.wte.weight.detach().norm().item(), rel=1e-3)


def test_no_logger_warns_once_and_uses_python_logging(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_llmdbg"):
        with pytest.warns(UserWarning, match="no logger") as warned:
            trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[GradientMonitor(every_n_steps=1)], **trainer_kwargs())
            trainer.fit(small_gpt(), small_data())
    assert sum("no logger" in str(w.message) for w in warned) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_llmdbg"]
    assert len(lines) == 3 and all("llmdbg/grad_norm/total=" in line for line in lines)


def test_statistics_can_be_switched_off(tmp_path):
    _, events = _fit(tmp_path, [GradientMonitor(every_n_steps=1, absmax=False, param_norm=False)], max_steps=2)
    families = {t.split("/")[1] for t in events.Tags()["scalars"] if t.startswith("llmdbg/")}
    assert families == {"grad_norm", "grad_nonfinite"}


def test_manual_optimization_with_two_optimizers_measures_each_optimizers_parameters(tmp_path):
    seen = {}

    class TwoOptimizers(type(small_gpt())):
        def __init__(self, config):
            super().__init__(config)
            self.automatic_optimization = False

        def configure_optimizers(self):
            blocks = list(self.model.transformer.h.parameters())
            ids = {id(p) for p in blocks}
            rest = [p for p in self.parameters() if id(p) not in ids]
            return torch.optim.SGD(blocks, lr=0.01), torch.optim.SGD(rest, lr=0.01)

        def training_step(self, batch, batch_idx):
            loss, _ = self._losses(batch)
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(loss)
            for i, optimizer in enumerate(self.optimizers()):
                params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
                seen[(batch_idx, i)] = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
                optimizer.step()

    pl.seed_everything(0)
    model = TwoOptimizers(small_gpt().config)
    # Manual optimization counts each optimizer's step: batches start at global steps 0, 2, 4, 6, and every 4th
    # step samples batches 0 and 2 (both optimizers, logged at the step the batch started on).
    monitor = GradientMonitor(every_n_steps=4, warmup_steps=0, update_ratio=True)
    trainer, events = _fit(tmp_path, [monitor], max_steps=8, model=model)
    opt0, opt1 = scalars(events, "llmdbg/grad_norm/total_opt0"), scalars(events, "llmdbg/grad_norm/total_opt1")
    assert sorted(opt0) == sorted(opt1) == [0, 4] and monitor.samples_taken == 2
    for (batch_idx, i), expected in seen.items():
        if batch_idx in (0, 2):
            assert_close((opt0 if i == 0 else opt1)[2 * batch_idx], expected, 1e-5, f"optimizer {i} at batch {batch_idx}")
    assert set(scalars(events, "llmdbg/grad_norm/block_0")) == set(opt0)  # blocks belong to optimizer 0
    assert set(scalars(events, "llmdbg/grad_norm/head")) == set(opt1)
    # Both optimizers step in the same batch: each one's update ratio is that of its own plain SGD step.
    for group in GROUPS:
        ratio, grad, weight = (scalars(events, f"llmdbg/{f}/{group}") for f in ("update_ratio", "grad_norm", "param_norm"))
        assert sorted(ratio) == sorted(grad) and len(ratio) == 2, group
        for step in ratio:
            # ΔW is a float32 difference of W's: at lr 0.01 it keeps about 3 digits of |ΔW| / |W| ~ 1e-4.
            assert_close(ratio[step], 0.01 * grad[step] / weight[step], 3e-3, f"update_ratio/{group}@{step}")
