"""ActivationProbe on a Hugging Face GPT-2 built from a small config (no download)."""

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_llmdbg import ActivationProbe
from tests.callbacks.test_activation_probe import _independent_stats
from tests.helpers import assert_close, read_events, scalars, small_data, trainer_kwargs

N_LAYER = 3


class HFGPT2(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=N_LAYER, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config, attn_implementation="eager") if _takes_attn_kwarg() else _eager(config)

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


def _eager(config):
    config._attn_implementation = "eager"
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
    for i, probs in enumerate(seen["attentions"]):
        p = probs.double()
        per_head = -torch.special.xlogy(p, p).sum(-1).mean(dim=(0, 2))
        assert_close(scalars(events, f"llmdbg/attn/transformer.h.{i}/entropy_mean")[0], per_head.mean().item(), 1e-5, f"entropy {i}")
        assert_close(scalars(events, f"llmdbg/attn/transformer.h.{i}/entropy_min")[0], per_head.min().item(), 1e-5, f"min entropy {i}")
    assert_close(scalars(events, "llmdbg/logits/lse_sq")[0], seen["lse_sq"], 1e-5, "lse_sq")
    assert_close(scalars(events, "llmdbg/logits/max")[0], seen["max"], 1e-6, "max logit")
