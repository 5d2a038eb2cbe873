import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_llmdbg import ActivationProbe, stats
from tests.helpers import (
    assert_close,
    compiler_missing,
    count_hooks,
    read_events,
    requires_compiler,
    scalars,
    small_data,
    small_gpt,
    trainer_kwargs,
)

B, T, C = 4, 10, 20


def _known_outputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(B, T, C, generator=g) * 1.7 + 0.3
    dead = torch.randn(B, T, C, generator=g)
    dead[..., :6] = -dead[..., :6].abs()  # 6 of 20 channels (30%) never exceed zero
    dead[..., 10] = 0.0  # exact zeros, and a channel that is zero everywhere also counts as dead
    dead[0, 0, 6:] = dead[0, 0, 6:].abs() + 0.1  # make sure every other channel exceeds zero somewhere
    dead[..., 10] = 0.0
    outliers = torch.randn(B, T, C, generator=g).clamp(-3, 3)
    positions = B * T
    for channel, share in ((2, 0.06), (7, 0.5), (15, 1.0)):  # 3 outlier channels, one exactly at the 6% limit
        k = math.ceil(share * positions)
        outliers.view(-1, C)[:k, channel] = 8.0
    outliers.view(-1, C)[:2, 4] = -9.0  # |x| >= 6 at 5% of positions: not an outlier channel
    return [plain, dead, outliers]


class KnownOutputs(pl.LightningModule):
    """Blocks whose outputs are fixed, seeded tensors, scaled by ``1 + batch index / 10`` (which keeps signs, so
    dead channels stay dead and micro-batches differ) and by a scalar parameter (so that there are gradients)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Fixed(out) for out in _known_outputs()])

    def training_step(self, batch, batch_idx):
        return sum((block(batch) ** 2).mean() for block in self.blocks)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(64.0).view(64, 1), batch_size=1)


def _batch_output(out: torch.Tensor, batch_index: int) -> torch.Tensor:
    return out * (1 + batch_index / 10)


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.register_buffer("out", out)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, batch):
        return _batch_output(self.out, float(batch.view(-1)[0])) * self.scale


def _independent_stats(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    flat = x.reshape(-1, x.shape[-1])
    mean, var = x.mean(), x.var(unbiased=False)
    channel_rms = flat.pow(2).mean(0).sqrt()
    return {
        "mean": mean.item(),
        "std": var.sqrt().item(),
        "rms": x.pow(2).mean().sqrt().item(),
        "absmax": x.abs().max().item(),
        "zero_frac": (x == 0).double().mean().item(),
        "dead_frac": (flat.max(0).values <= 0).double().mean().item(),
        "outliers": float(((flat.abs() >= 6).double().mean(0) >= 0.06).sum()),
        "channel_kurtosis": (channel_rms.pow(4).mean() / channel_rms.pow(2).mean().pow(2)).item(),
        "kurtosis": ((x - mean).pow(4).mean() / var.pow(2)).item(),
    }


@pytest.mark.parametrize("statistics", [pytest.param("compiled", marks=requires_compiler), "eager", "cannot-compile"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_statistics_equal_an_independent_computation(tmp_path, monkeypatch, accumulate, statistics):
    """Compiled (the default), eager, and eager after torch.compile failed, with one warning that says so."""
    if statistics == "cannot-compile":
        compiler_missing(monkeypatch)
    elif statistics == "eager":
        monkeypatch.setattr(stats, "_COMPILED", {})
    probe = ActivationProbe(every_n_steps=1, gradients=True, compile_statistics=statistics != "eager")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        max_steps=2, logger=logger, callbacks=[probe], accumulate_grad_batches=accumulate, **trainer_kwargs(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(KnownOutputs())
    fallbacks = [str(w.message) for w in caught if "could not compile" in str(w.message)]
    if statistics == "cannot-compile":
        assert fallbacks == [
            "ActivationProbe: torch.compile could not compile its statistics (RuntimeError: InvalidCxxCompiler: No "
            "working C++ compiler found); they run eager from now on, which costs more on each sampled step. Pass "
            "compile_statistics=False to skip the attempt."
        ]
    else:
        assert fallbacks == [] and probe._statistics.failure is None
        # Compiled and called without an error, or eager by choice (nothing compiled in this test):
        assert (stats.fused_activation_partials in stats._COMPILED) == (statistics == "compiled")
    events = read_events(logger.log_dir)
    for i, out in enumerate(_known_outputs()):
        for step in (0, 1):
            # A step's statistics are those of all its micro-batches together.
            joined = torch.cat([_batch_output(out, b) for b in range(step * accumulate, (step + 1) * accumulate)])
            for stat, value in _independent_stats(joined).items():
                logged = scalars(events, f"llmdbg/act/block_{i}/{stat}")
                assert sorted(logged) == [0, 1]
                if value == 0:
                    assert logged[step] == 0, stat
                else:
                    assert_close(logged[step], value, 1e-5, f"block_{i}/{stat}@{step}")
            # d(mean(y²) / accumulate) / dy = 2y / (numel · accumulate): its RMS over the step's micro-batches
            grad_rms = (2 * joined.double() / out.numel() / accumulate).pow(2).mean().sqrt().item()
            assert_close(scalars(events, f"llmdbg/act_grad/block_{i}/rms")[step], grad_rms, 1e-5, f"act_grad block_{i}")
    assert scalars(events, "llmdbg/act/block_1/dead_frac")[0] == pytest.approx(0.35)  # 6 negative + 1 all-zero channel
    assert scalars(events, "llmdbg/act/block_2/outliers")[0] == 3.0
    assert scalars(events, "llmdbg/act/block_0/dead_frac")[0] == 0.0


class CalledTwice(KnownOutputs):
    """Each block runs twice in one forward pass (as a weight-shared layer does), on two different inputs."""

    def training_step(self, batch, batch_idx):
        return sum((block(batch) ** 2).mean() + (block(batch + 5) ** 2).mean() for block in self.blocks)


def test_a_module_called_twice_in_a_forward_pass_counts_both_calls(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=1, logger=logger, callbacks=[ActivationProbe(every_n_steps=1)], **trainer_kwargs())
    trainer.fit(CalledTwice())
    events = read_events(logger.log_dir)
    for i, out in enumerate(_known_outputs()):
        # The two calls' outputs differ in scale, so their partial sums are about different means.
        joined = torch.cat([_batch_output(out, 0), _batch_output(out, 5)])
        for stat, value in _independent_stats(joined).items():
            logged = scalars(events, f"llmdbg/act/block_{i}/{stat}")[0]
            if value == 0:
                assert logged == 0, stat
            else:
                assert_close(logged, value, 1e-5, f"block_{i}/{stat}")


def _gpt_fit(tmp_path, probe, model=None, max_steps=2, name="tb"):
    model = model or small_gpt()
    logger = TensorBoardLogger(str(tmp_path), name=name)
    trainer = pl.Trainer(max_steps=max_steps, logger=logger, callbacks=[probe], **trainer_kwargs())
    trainer.fit(model, small_data())
    return model, read_events(logger.log_dir)


def test_dead_mlp_units_show_in_the_faulty_block_only(tmp_path):
    model = small_gpt()
    with torch.no_grad():
        model.model.transformer.h[1].mlp.c_fc.bias.fill_(-100.0)
    _, events = _gpt_fit(tmp_path, ActivationProbe(modules=["transformer.h.*.mlp.gelu"], every_n_steps=1), model, max_steps=1)
    dead = {i: scalars(events, f"llmdbg/act/transformer.h.{i}.mlp.gelu/dead_frac")[0] for i in range(3)}
    assert dead[1] == 1.0
    assert dead[0] < 0.05 and dead[2] < 0.05


def test_scaled_residual_branch_shows_in_the_faulty_block_only(tmp_path):
    def attn_rms(model, name):
        _, events = _gpt_fit(tmp_path, ActivationProbe(modules=["transformer.h.*.attn"], every_n_steps=1), model, max_steps=1, name=name)
        return [scalars(events, f"llmdbg/act/transformer.h.{i}.attn/rms")[0] for i in range(3)]

    clean = attn_rms(small_gpt(), "clean")
    faulty = small_gpt()
    with torch.no_grad():
        faulty.model.transformer.h[1].attn.c_proj.weight.mul_(50.0)
        faulty.model.transformer.h[1].attn.c_proj.bias.mul_(50.0)
    broken = attn_rms(faulty, "faulty")
    assert broken[1] / clean[1] == pytest.approx(50.0, rel=1e-3)
    assert broken[0] == pytest.approx(clean[0], rel=1e-6)  # block 0 runs before the fault
    # LayerNorm keeps block 2's branch near its scale: its input changed direction, not size.
    assert 0.3 < broken[2] / clean[2] < 3.0


def test_reference_gpt_attention_entropy_and_logits(tmp_path):
    model = small_gpt()
    seen = {}

    class Direct(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                with torch.no_grad():  # block 0's attention by hand, in float64, from its weights
                    gpt = pl_module.model.transformer
                    ids = batch["input_ids"]
                    x = gpt.h[0].ln_1(gpt.wte(ids) + gpt.wpe(torch.arange(ids.shape[1]))).double()
                    attn = gpt.h[0].attn
                    q, k, _ = torch.nn.functional.linear(x, attn.c_attn.weight.double(), attn.c_attn.bias.double()).chunk(3, -1)
                    B, T, C = q.shape
                    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
                    scores = (q @ k.transpose(-2, -1)) / (C // attn.n_head) ** 0.5
                    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                    probs = scores.softmax(-1)
                    per_head = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
                    logits = pl_module(ids).double()
                seen.update(entropy_mean=per_head.mean().item(), entropy_min=per_head.min().item(),
                            logit_max=scores.max().item(),
                            lse_sq=torch.logsumexp(logits, -1).pow(2).mean().item(), max=logits.max().item())

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=1, logger=logger, callbacks=[Direct(), ActivationProbe(every_n_steps=1)], **trainer_kwargs())
    trainer.fit(model, small_data())
    events = read_events(logger.log_dir)
    assert_close(scalars(events, "llmdbg/attn/block_0/entropy_mean")[0], seen["entropy_mean"], 1e-5, "entropy_mean")
    assert_close(scalars(events, "llmdbg/attn/block_0/entropy_min")[0], seen["entropy_min"], 1e-5, "entropy_min")
    assert_close(scalars(events, "llmdbg/attn/block_0/logit_max")[0], seen["logit_max"], 1e-5, "attention logit max")
    assert_close(scalars(events, "llmdbg/logits/lse_sq")[0], seen["lse_sq"], 1e-5, "lse_sq")
    assert_close(scalars(events, "llmdbg/logits/max")[0], seen["max"], 1e-5, "max logit")
    assert not any(block.attn.return_attention for block in model.model.transformer.h)


def test_hooks_exist_only_on_sampled_steps_and_none_remain(tmp_path):
    counts = {}

    class Count(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):  # runs after the probe's (callback order)
            counts[("start", trainer.global_step)] = count_hooks(pl_module)

        def on_before_backward(self, trainer, pl_module, loss):
            counts[("backward", trainer.global_step)] = count_hooks(pl_module)

    model = small_gpt()
    _gpt_fit(tmp_path, ActivationProbe(every_n_steps=2), model, max_steps=4)
    assert count_hooks(model) == 0
    model = small_gpt()
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[ActivationProbe(every_n_steps=2), Count()], **trainer_kwargs())
    trainer.fit(model, small_data())
    assert [counts[("start", s)] for s in range(4)] == [3 + 3 + 1, 0, 7, 0]  # 3 blocks, 3 attention modules, the head
    assert all(counts[("backward", s)] == 0 for s in range(4))  # removed once the forward pass is over
    assert count_hooks(model) == 0


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_hook_remains_after_an_exception_mid_step(tmp_path, error):
    class Fails(type(small_gpt())):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)  # the forward pass ran with the hooks on
            if self.global_step == 2:
                raise error("boom")
            return out

    pl.seed_everything(0)
    model = Fails(small_gpt().config)
    probe = ActivationProbe(every_n_steps=1, gradients=True)
    trainer = pl.Trainer(max_steps=5, logger=False, callbacks=[probe], **trainer_kwargs())
    # Lightning shuts down gracefully on an interrupt, then exits.
    with pytest.raises(SystemExit if error is KeyboardInterrupt else RuntimeError):
        trainer.fit(model, small_data())
    assert count_hooks(model) == 0
    assert not any(block.attn.return_attention for block in model.model.transformer.h)
    assert probe._acc.sums == {}


def test_histograms_leave_out_nan_and_inf_and_count_the_rest(tmp_path, monkeypatch, caplog):
    import numpy as np

    from lightning_llmdbg import stats

    outputs = _known_outputs()
    outputs[0].view(-1)[:5] = float("nan")
    outputs[0].view(-1)[5:7] = float("inf")
    monkeypatch.setattr(f"{__name__}._known_outputs", lambda: outputs)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=2, logger=logger, callbacks=[ActivationProbe(every_n_steps=1, histograms=True)], **trainer_kwargs())
    with caplog.at_level("WARNING", logger="lightning_llmdbg"):
        trainer.fit(KnownOutputs())
    assert any("llmdbg/act_hist/block_0 at step 0: 7 non-finite values left out" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    events = read_events(logger.log_dir)
    assert math.isnan(scalars(events, "llmdbg/act/block_0/mean")[1])  # reported, and training went on
    for i, out in enumerate(outputs):
        hist = events.Histograms(f"llmdbg/act_hist/block_{i}")[0].histogram_value
        out = _batch_output(out, 0)
        finite = out[torch.isfinite(out)].double().numpy()
        assert hist.num == finite.size == out.numel() - (7 if i == 0 else 0)
        edges = stats.FIXED_EDGES.numpy()
        counts, _ = np.histogram(finite, bins=edges)
        nonzero = np.nonzero(counts)[0]
        assert list(hist.bucket) == counts[nonzero[0] : nonzero[-1] + 1].tolist()
        assert list(hist.bucket_limit) == pytest.approx(edges[nonzero[0] + 1 : nonzero[-1] + 2].tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modules="layers"), "`modules` must be"),
        (dict(modules=[3]), "got 3"),
        (dict(stats=["rms", "median"]), "median"),
        (dict(every_n_steps=0), "every_n_steps.*0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationProbe(**kwargs)


def test_pattern_matching_nothing_names_it_and_the_closest_modules(tmp_path):
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[ActivationProbe(modules=["transformer.hh.*"])], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"'transformer\.hh\.\*' matches nothing\. Closest module names: 'model\.transformer\.h"):
        trainer.fit(small_gpt(), small_data())


def test_model_without_blocks_says_what_to_pass(tmp_path):
    class NoBlocks(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.net(torch.ones(4)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[ActivationProbe()], **trainer_kwargs())
    with pytest.raises(ValueError, match="No transformer blocks found.*modules="):
        trainer.fit(NoBlocks(), small_data())


def test_layers_built_in_configure_model_are_found_at_fit_start(tmp_path):
    class Deferred(type(small_gpt())):
        def __init__(self, config):
            pl.LightningModule.__init__(self)
            self.config, self.lr, self.weight_decay = config, 1e-3, 0.1

        def configure_model(self):
            if not hasattr(self, "model"):
                from lightning_llmdbg.testing.tiny_gpt import TinyGPT

                self.model = TinyGPT(self.config)

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=1, logger=logger, callbacks=[ActivationProbe(every_n_steps=1)], **trainer_kwargs())
    trainer.fit(Deferred(small_gpt().config), small_data())
    assert {f"llmdbg/act/block_{i}/rms" for i in range(3)} <= set(read_events(logger.log_dir).Tags()["scalars"])


def test_a_users_return_attention_setting_is_restored(tmp_path):
    model = small_gpt()
    model.model.transformer.h[0].attn.return_attention = True  # the user wants the weights themselves
    _gpt_fit(tmp_path, ActivationProbe(every_n_steps=1), model, max_steps=1)
    assert [b.attn.return_attention for b in model.model.transformer.h] == [True, False, False]


def test_micro_batch_partials_add_up_and_a_width_change_is_left_out_with_a_warning():
    from lightning_llmdbg.callbacks.activation_probe import _Accumulator

    acc = _Accumulator()
    acc.add("attn/block_0", torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
    acc.add("attn/block_0", torch.tensor([10.0, 20.0]), torch.tensor([-5.0]))
    with pytest.warns(UserWarning, match=r"attn/block_0 changed width within a step \(\(2,\) then \(3,\)\)"):
        acc.add("attn/block_0", torch.tensor([1.0, 1.0, 1.0]), torch.tensor([99.0]))
    assert acc.sums["attn/block_0"].tolist() == [11.0, 22.0]
    assert acc.maxes["attn/block_0"].tolist() == [3.0]
    # Activation partials are sums about each micro-batch's own mean: they add up moved to shift 0.
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0)) + 5
    for part in (x[:1], x[1:]):
        acc.add("act/block_0", *stats.activation_partials(part))
    whole = stats.activation_stats(*stats.activation_partials(x))
    merged = stats.activation_stats(acc.sums["act/block_0"], acc.maxes["act/block_0"])
    assert merged == pytest.approx(whole, rel=1e-6)
    acc.add("grad/block_0", torch.tensor([4.0, 2.0]))
    assert "grad/block_0" not in acc.maxes and acc.sums["grad/block_0"].tolist() == [4.0, 2.0]


def _assert_entropy_of(attentions, events, module: str = "transformer.h.{i}") -> list[torch.Tensor]:
    """Each layer's logged mean and lowest-head entropy (``module`` names layer ``i``) equal those of its attention
    probabilities ``[B, H, L, S]``, computed here in float64; returns the per-head entropies."""
    entropies = []
    for i, probs in enumerate(attentions):
        p, tag = probs.double(), f"llmdbg/attn/{module.format(i=i)}"
        per_head = -torch.special.xlogy(p, p).sum(-1).mean(dim=(0, 2))
        assert_close(scalars(events, f"{tag}/entropy_mean")[0], per_head.mean().item(), 1e-5, f"entropy {i}")
        assert_close(scalars(events, f"{tag}/entropy_min")[0], per_head.min().item(), 1e-5, f"min entropy {i}")
        entropies.append(per_head)
    return entropies


class TorchTransformerLM(pl.LightningModule):
    """A causal LM on PyTorch's own ``nn.TransformerEncoder``, whose attention is ``nn.MultiheadAttention``."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.lm_head = nn.Linear(32, 256)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        logits = self.lm_head(self.encoder(self.embed(ids), mask=mask, is_causal=True))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


CHUNK_OF_5_ROWS = 4 * 4 * (32 + 2) * 5  # batch × heads × (keys + 2) × rows


@pytest.mark.parametrize("dropout, chunk_values", [(0.0, None), (0.1, CHUNK_OF_5_ROWS)], ids=["whole", "dropout-chunked"])
def test_torch_transformer_layers_log_the_entropy_of_their_multihead_attention_weights(
    tmp_path, monkeypatch, dropout, chunk_values
):
    """`nn.MultiheadAttention` hands its whole call to a function mode, so the probe repeats that call without
    gradient and without dropout (in chunks of 5 query rows in the second case), asking for its per-head weights:
    the entropy equals theirs, and training is the same as without the probe."""
    from lightning_llmdbg.callbacks import activation_probe

    if chunk_values is not None:
        monkeypatch.setattr(activation_probe, "_MULTI_HEAD_CHUNK_VALUES", chunk_values)
    seen, losses, passes = {}, {}, []
    entropy_of = stats.FusedStatistics.attention
    def counted(self, weights):
        passes.append(weights.shape[2])  # query rows
        return entropy_of(self, weights)

    monkeypatch.setattr(stats.FusedStatistics, "attention", counted)

    class Direct(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:  # each layer's weights by hand, in float64, from a copy of the layers
                import copy

                ids = batch["input_ids"]
                mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=torch.float64)
                with torch.no_grad():
                    x = pl_module.embed(ids).double()
                    for i, layer in enumerate(copy.deepcopy(pl_module.encoder.layers).double().eval()):
                        _, p = layer.self_attn(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
                        seen[i] = p
                        x = layer(x, src_mask=mask, is_causal=True)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.setdefault(self.run, []).append(outputs["loss"].item())

    for run, callbacks in (("plain", []), ("probed", [ActivationProbe(modules=["encoder.layers.*"], every_n_steps=1)])):
        pl.seed_everything(0)
        module, direct = TorchTransformerLM(dropout), Direct()
        direct.run = run
        logger = TensorBoardLogger(str(tmp_path), name=run)
        trainer = pl.Trainer(max_steps=3, logger=logger, callbacks=[direct, *callbacks], **trainer_kwargs())
        trainer.fit(module, small_data())
    events = read_events(logger.log_dir)
    attention = sorted(t for t in events.Tags()["scalars"] if t.startswith("llmdbg/attn/"))
    kinds = ("entropy_mean", "entropy_min")  # weights but no logits: no logit_max
    assert attention == [f"llmdbg/attn/encoder.layers.{i}/{s}" for i in range(2) for s in kinds]
    # With dropout, layer 1's input is the dropped-out output of layer 0: only layer 0's weights can be had by hand.
    layers = [seen[i] for i in (range(2) if dropout == 0.0 else range(1))]
    for per_head in _assert_entropy_of(layers, events, "encoder.layers.{i}"):
        assert per_head.max() - per_head.min() > 1e-4  # the heads differ, so the minimum says something
    assert losses["probed"] == losses["plain"]  # the repeated call leaves the step, and its dropout, as they were
    rows_per_pass = [32] if chunk_values is None else [5, 5, 5, 5, 5, 5, 2]  # query rows (block size 32)
    assert passes == rows_per_pass * 2 * 3  # per layer and step
    assert count_hooks(module) == 0 and torch._C._len_torch_function_stack() == 0


class FrozenEncoderLM(TorchTransformerLM):
    """The encoder frozen and in eval mode, with a padding mask: PyTorch runs it on its fast path, in nested tensors."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.embed.requires_grad_(False)
        self.encoder.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        self.encoder.eval()
        ids = batch["input_ids"]
        padding = torch.zeros_like(ids, dtype=torch.bool)
        padding[:, -5:] = True
        hidden = self.encoder(self.embed(ids), src_key_padding_mask=padding)
        return nn.functional.cross_entropy(self.lm_head(hidden).flatten(0, 1), ids.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.lm_head.parameters(), lr=0.1)


def test_nested_tensors_on_pytorchs_fast_path_are_left_out_and_training_goes_on(tmp_path):
    """Entering the capture mode would turn nn.MultiheadAttention's fast path off, and its slow path refuses nested
    tensors: the probe leaves such calls alone (it used to stop training with an AssertionError)."""
    losses = {"plain": [], "probed": []}

    class Losses(pl.Callback):
        def __init__(self, run):
            self.run = run

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[self.run].append(outputs["loss"].item())

    for run, callbacks in (("plain", []), ("probed", [ActivationProbe(modules=["encoder.layers.*"], every_n_steps=1)])):
        pl.seed_everything(0)
        module = FrozenEncoderLM()
        trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[*callbacks, Losses(run)], **trainer_kwargs())
        trainer.fit(module, small_data())
    # Not bit for bit: with hooks on its layers PyTorch leaves the encoder's fused kernel for its plain path.
    assert losses["probed"] == pytest.approx(losses["plain"], rel=1e-5) and len(losses["plain"]) == 3
    assert count_hooks(module) == 0 and torch._C._len_torch_function_stack() == 0
