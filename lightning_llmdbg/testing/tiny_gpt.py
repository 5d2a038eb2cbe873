"""A small byte-level GPT in the nanoGPT layout (``transformer.wte/wpe/h.N/ln_f``, ``lm_head``), ~2M parameters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Fused attention (``scaled_dot_product_attention``); with ``return_attention`` set, eager attention that
    returns ``(output, probabilities [B, H, T, T] without gradient, largest attention logit)``: the first two as
    Hugging Face eager attention returns them (ActivationProbe sets it on sampled steps only)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head}).")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.return_attention = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if not getattr(self, "return_attention", False):  # (a benchmark removes it to measure the other path)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        # Eager attention, as Hugging Face's `attn_implementation="eager"`: the output is made of the probabilities
        # returned. In a CPU training step it costs a few percent over the fused kernel, where the fused kernel
        # followed by a separate, gradient-free probability pass cost 8% (BENCHMARKS.md).
        causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=x.device).triu_(1)
        scores = torch.baddbmm(causal, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=1.0 / math.sqrt(k.shape[-1]))
        logit_max = scores.detach().amax() if scores.numel() else scores.new_full((), float("-inf"))  # an empty batch
        probs = scores.softmax(dim=-1)
        y = torch.bmm(F.dropout(probs, p=dropout) if dropout else probs, v.flatten(0, 1))
        out = self.c_proj(y.view(B, self.n_head, T, C // self.n_head).transpose(1, 2).contiguous().view(B, T, C))
        return out, probs.detach().view(B, self.n_head, T, T), logit_max


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.ln_1(x))
        x = x + (attended[0] if isinstance(attended, tuple) else attended)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT's model, byte-level, with an untied LM head so that ``head`` is its own parameter group."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class TinyGPTModule(pl.LightningModule):
    """Lightning wrapper: next-byte cross-entropy, AdamW with weight decay on matrices only.

    ``training_step`` returns ``{"loss", "per_example_loss"}`` so that example-based callbacks can use it.

    Args:
        config: model shape (a :class:`GPTConfig` or its dict).
        lr: AdamW learning rate.
        weight_decay: applied to 2-D parameters only.
    """

    def __init__(self, config: GPTConfig | dict | None = None, lr: float = 1e-3, weight_decay: float = 0.1) -> None:
        super().__init__()
        config = GPTConfig(**config) if isinstance(config, dict) else (config or GPTConfig())
        self.save_hyperparameters({"config": asdict(config), "lr": lr, "weight_decay": weight_decay})
        self.config = config
        self.lr = lr
        self.weight_decay = weight_decay
        self.model = TinyGPT(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"])
        token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        per_example = token_loss.view_as(batch["labels"]).mean(dim=1)
        return per_example.mean(), per_example

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        loss, per_example = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "per_example_loss": per_example.detach()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self._losses(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))
