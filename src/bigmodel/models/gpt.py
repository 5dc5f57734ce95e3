"""A small GPT-style model in plain PyTorch, sized by its float32 weight bytes: the built-in
model of ``bigmodel demo``. It has what real models have and loaders get wrong: a tied output
head, a non-persistent buffer computed by the model itself, and repeated blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of a :class:`DemoGPT`; :meth:`for_size` picks them from a weight budget."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    context: int = 256

    @classmethod
    def for_size(cls, nbytes: int) -> DemoConfig:
        """A config whose float32 weights take about ``nbytes``."""
        hidden = 2048 if nbytes >= 800e6 else 1024 if nbytes >= 100e6 else 256
        vocab = 32000 if hidden >= 1024 else 4096
        per_layer = 12 * hidden * hidden * 4
        layers = max(1, round((nbytes - vocab * hidden * 4) / per_layer))
        return cls(vocab=vocab, hidden=hidden, layers=layers, heads=max(1, hidden // 128))


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.up = nn.Linear(cfg.hidden, 4 * cfg.hidden, bias=False)
        self.down = nn.Linear(4 * cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, 3, self.heads, c // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = (
            functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            .transpose(1, 2)
            .reshape(b, t, c)
        )
        x = x + self.proj(attn)
        out: torch.Tensor = x + self.down(functional.gelu(self.up(self.norm2(x))))
        return out


class DemoGPT(nn.Module):
    """A small GPT: token embedding, sinusoidal positions (a non-persistent buffer computed by
    the model itself), pre-norm blocks, and an output head tied to the embedding."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        position = torch.arange(cfg.context).unsqueeze(1)
        freq = torch.exp(torch.arange(0, cfg.hidden, 2) * (-math.log(10000.0) / cfg.hidden))
        table = torch.zeros(cfg.context, cfg.hidden)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq)
        self.register_buffer("positions", table, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions: torch.Tensor = self.positions  # type: ignore[assignment]
        x = self.embed(ids) + positions[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits
