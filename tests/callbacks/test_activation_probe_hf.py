"""ActivationProbe on a Hugging Face GPT-2 built from a small config (no download)."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_llmdbg import ActivationProbe
from lightning_llmdbg.testing.hooks import count_hooks
from tests.callbacks.test_activation_probe import _assert_entropy_of, _independent_stats
from tests.helpers import assert_close, read_events, scalars, small_data, trainer_kwargs

N_LAYER = 3


class HFGPT2(pl.LightningModule):
    def __init__(self, attention: str = "eager"):
        super().__init__()
        config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=N_LAYER, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config, attn_implementation=attention) if _takes_attn_kwarg() else _with_attention(config, attention)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _takes_attn_kwarg() -> bool:
    try:
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=8, n_positions=4), attn_implementation="eager")
        return True
    except TypeError:
        return False


def _with_attention(config, attention):
    config._attn_implementation = attention
    return GPT2LMHeadModel(config)


def test_gpt2_blocks_and_eager_attention_match_output_hidden_states(tmp_path):
    pl.seed_everything(0)
    module = HFGPT2()
    assert module.model.config._attn_implementation == "eager"
    seen = {}

    class Direct(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                with torch.no_grad():
                    out = pl_module.model(input_ids=batch["input_ids"], output_hidden_states=True, output_attentions=True)
                seen["hidden"] = [h.clone() for h in out.hidden_states]
                seen["attentions"] = [a.clone() for a in out.attentions]
                seen["lse_sq"] = torch.logsumexp(out.logits.double(), -1).pow(2).mean().item()
                seen["max"] = out.logits.max().item()

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=1, logger=logger, callbacks=[Direct(), probe], **trainer_kwargs())
    trainer.fit(module, small_data())
    events = read_events(logger.log_dir)

    assert sorted(probe_keys := {t.split("/")[2] for t in events.Tags()["scalars"] if t.startswith("llmdbg/act/")}) == [
        f"transformer.h.{i}" for i in range(N_LAYER)
    ], probe_keys
    # hidden_states[i + 1] is block i's output, except the last entry, which HF takes after the final LayerNorm.
    for i in range(N_LAYER - 1):
        for stat, value in _independent_stats(seen["hidden"][i + 1]).items():
            assert_close(scalars(events, f"llmdbg/act/transformer.h.{i}/{stat}")[0], value, 1e-5, f"block {i} {stat}")
    _assert_entropy_of(seen["attentions"], events)
    assert_close(scalars(events, "llmdbg/logits/lse_sq")[0], seen["lse_sq"], 1e-5, "lse_sq")
    assert_close(scalars(events, "llmdbg/logits/max")[0], seen["max"], 1e-6, "max logit")


def _sharpened(module: HFGPT2) -> HFGPT2:
    """Larger query and key weights than at initialisation, so that attention is far from uniform."""
    with torch.no_grad():
        for block in module.model.transformer.h:
            block.attn.c_attn.weight.mul_(20.0)
    return module


def test_gpt2_under_sdpa_attention_logs_the_entropy_and_logit_max_of_weights_it_never_returns(tmp_path):
    pl.seed_everything(0)
    module = _sharpened(HFGPT2("sdpa"))
    assert module.model.config._attn_implementation == "sdpa"
    seen = {}

    class Direct(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != 0:
                return
            twin = HFGPT2("eager")  # the same weights under eager attention, which returns its probabilities
            twin.load_state_dict(pl_module.state_dict())
            with torch.no_grad():
                out = twin.model(input_ids=batch["input_ids"], output_attentions=True, output_hidden_states=True)
                seen["attentions"] = [a.clone() for a in out.attentions]
                seen["logit_max"] = []
                for i, block in enumerate(twin.model.transformer.h):  # q·k/√d by hand from the block's input
                    x = block.ln_1(out.hidden_states[i]).double()
                    q, k, _ = (x @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()).chunk(3, -1)
                    B, T, C = q.shape
                    q, k = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k))
                    logits = (q @ k.transpose(-2, -1)) / (C // 4) ** 0.5
                    seen["logit_max"].append(logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).max().item())

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=2, logger=logger, callbacks=[Direct(), probe], **trainer_kwargs())
    trainer.fit(module, small_data())
    events = read_events(logger.log_dir)

    entropies = _assert_entropy_of(seen["attentions"], events)
    for i in range(N_LAYER):
        assert_close(scalars(events, f"llmdbg/attn/transformer.h.{i}/logit_max")[0], seen["logit_max"][i], 1e-5, f"logit max {i}")
        assert set(scalars(events, f"llmdbg/attn/transformer.h.{i}/entropy_mean")) == {0, 1}
    assert entropies[0].max() - entropies[0].min() > 0.1, "the heads should differ for this test to mean much"
    assert count_hooks(module) == 0
    assert torch._C._len_torch_function_stack() == 0, "a function mode outlived the fit"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_an_sdpa_attention_module_leaves_no_hook_and_no_mode(tmp_path, error):
    pl.seed_everything(0)
    module = HFGPT2("sdpa")

    def fail_at_step_one(mod, args):  # inside the attention module's forward, after its SDPA call
        if trainer.global_step == 1:
            raise error("boom")

    handle = module.model.transformer.h[1].attn.c_proj.register_forward_pre_hook(fail_at_step_one)
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)], **trainer_kwargs())
    with pytest.raises(SystemExit if error is KeyboardInterrupt else RuntimeError):
        trainer.fit(module, small_data())
    handle.remove()
    assert count_hooks(module) == 0
    assert torch._C._len_torch_function_stack() == 0, "a function mode outlived the fit"
    assert not any("_llmdbg_capture" in m.__dict__ for m in module.modules())


def test_weights_that_cannot_be_formed_again_stop_that_entropy_with_a_warning_not_training(tmp_path, monkeypatch):
    from lightning_llmdbg import stats

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no room")

    monkeypatch.setattr(stats, "scaled_dot_product_attention_partials", broken)
    pl.seed_everything(0)
    module = HFGPT2("sdpa")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
    trainer = pl.Trainer(max_steps=3, logger=logger, callbacks=[probe], accumulate_grad_batches=2, **trainer_kwargs())
    with pytest.warns(UserWarning, match=r"'transformer.h.0' could not be recomputed .*RuntimeError: no room") as record:
        trainer.fit(module, small_data())
    assert not [w for w in record if "neither returned" in str(w.message)]  # one warning says why, not two
    quoted = [str(w.message).count("no room") for w in record if "could not be recomputed" in str(w.message)]
    assert quoted == [1] * N_LAYER  # one warning per module, the error once although both micro-batches failed
    assert trainer.global_step == 3 and len(calls) == 2 * N_LAYER  # tried on the first sampled step only
    tags = read_events(logger.log_dir).Tags()["scalars"]
    assert "llmdbg/act/transformer.h.0/rms" in tags and not any("/attn/" in t for t in tags)
    assert count_hooks(module) == 0 and torch._C._len_torch_function_stack() == 0


def test_an_error_caught_inside_training_step_leaves_the_mode_and_files_nothing(tmp_path):
    """`always_call`: the capture of a forward pass that raised is left at once and its partial sums dropped."""
    seen = {}

    def boom(mod, args):
        raise RuntimeError("boom")

    class CatchesOne(HFGPT2):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                handle = self.model.transformer.h[0].attn.c_proj.register_forward_pre_hook(boom)  # after its SDPA call
                try:
                    self.model(input_ids=(batch["input_ids"] + 1) % 256)  # other text: it would show if counted
                except RuntimeError:
                    pass
                handle.remove()
                seen["modes after the caught error"] = torch._C._len_torch_function_stack()
            return super().training_step(batch, batch_idx)

    entropy = {}
    for name, cls in (("clean", HFGPT2), ("caught", CatchesOne)):
        pl.seed_everything(0)
        module = _sharpened(cls("sdpa"))
        logger = TensorBoardLogger(str(tmp_path), name=name)
        probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
        pl.Trainer(max_steps=2, logger=logger, callbacks=[probe], **trainer_kwargs()).fit(module, small_data())
        entropy[name] = scalars(read_events(logger.log_dir), "llmdbg/attn/transformer.h.0/entropy_mean")
    assert seen["modes after the caught error"] == 0
    assert entropy["caught"][1] == pytest.approx(entropy["clean"][1], rel=1e-6)  # the failed pass did not count


def test_a_users_mode_entered_by_hooks_on_the_attention_module_nests_inside_the_probes(tmp_path):
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.sdpa_calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.sdpa_calls += func is torch.nn.functional.scaled_dot_product_attention
            return func(*args, **(kwargs or {}))

    pl.seed_everything(0)
    module = HFGPT2("sdpa")
    attn, entered, left = module.model.transformer.h[0].attn, [], []
    attn.register_forward_pre_hook(lambda m, a: entered.append(Counting().__enter__()))
    attn.register_forward_hook(lambda m, a, o: left.append(entered.pop()) or left[-1].__exit__(None, None, None))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
    pl.Trainer(max_steps=2, logger=logger, callbacks=[probe], **trainer_kwargs()).fit(module, small_data())
    assert torch._C._len_torch_function_stack() == 0, "a function mode outlived the fit"
    assert [m.sdpa_calls for m in left] == [1, 1]  # the user's mode saw each step's call
    assert set(scalars(read_events(logger.log_dir), "llmdbg/attn/transformer.h.0/entropy_mean")) == {0, 1}
    assert count_hooks(module) == 2  # the user's own pair


def _right_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Sequence i of the batch ends 3·i positions early (its keys there are masked; no query loses every key)."""
    mask = torch.ones_like(input_ids)
    for i in range(input_ids.shape[0]):
        if i:
            mask[i, -3 * i :] = 0
    return mask


def test_gpt2_under_sdpa_attention_with_padding_matches_the_eager_weights(tmp_path):
    class Padded(HFGPT2):
        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            return self.model(input_ids=ids, attention_mask=_right_padding(ids), labels=ids).loss

    pl.seed_everything(0)
    module = _sharpened(Padded("sdpa"))
    seen = {}

    class Direct(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                twin = HFGPT2("eager")
                twin.load_state_dict(pl_module.state_dict())
                ids = batch["input_ids"]
                with torch.no_grad():
                    out = twin.model(input_ids=ids, attention_mask=_right_padding(ids), output_attentions=True)
                seen["attentions"] = [a.clone() for a in out.attentions]

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = ActivationProbe(modules=["transformer.h.*"], every_n_steps=1)
    pl.Trainer(max_steps=1, logger=logger, callbacks=[Direct(), probe], **trainer_kwargs()).fit(module, small_data())
    _assert_entropy_of(seen["attentions"], read_events(logger.log_dir))
