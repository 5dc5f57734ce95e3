"""The toy models the tests save, place, offload and run, written once.

Each is parametrised by the few things the tests vary (widths, depth, a tied head, biases, a
buffer); the parameter *names* and shapes are what checkpoints, device maps and assertions
rely on, so they stay as documented here. A model unique to one test stays in that test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """``x + down(relu(up(x)))``, ``up``: width -> 2 * width, ``down`` back, both with bias.

    ``scale=True`` adds a non-persistent buffer ``scale`` (like rotary ``inv_freq``: not in the
    checkpoint, yet needed on the execution device) that multiplies the branch.
    """

    def __init__(self, width: int, *, scale: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.scaled = scale
        if scale:
            self.register_buffer("scale", torch.linspace(0.5, 1.5, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.down(torch.relu(self.up(x)))
        if self.scaled:
            branch = branch * self.scale
        return x + branch


class TinyLM(nn.Module):
    """``embed``, ``layers.N`` (ResidualBlock), ``norm``, ``head``: a language model's layout.

    The defaults (width 16, 6 layers, vocab 40, a bias-free head tied to the embedding) are the
    dispatch tests' model; ``tie=False``/``head_bias=True`` give an untied head with a bias;
    ``block(width)`` builds each layer instead of a ResidualBlock.
    """

    def __init__(
        self,
        width: int = 16,
        layers: int = 6,
        vocab: int = 40,
        *,
        tie: bool = True,
        head_bias: bool = False,
        scale: bool = False,
        block: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if block is None:
            block = functools.partial(ResidualBlock, scale=scale)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(block(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=head_bias)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class LinearPair(nn.Module):
    """Two bias-free square Linears ``a`` and ``b`` (width 10: 400 bytes each in fp32):
    ``b(a(x))``, or ``x + b(relu(a(x)))`` with ``residual=True``."""

    def __init__(self, width: int = 10, *, residual: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(width, width, bias=False)
        self.b = nn.Linear(width, width, bias=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.b(torch.relu(self.a(x)))
        return self.b(self.a(x))


class PairNet(TinyLM):
    """The planner tests' sizes: ``embed`` 800 B, ``layers`` of 800 B (LinearPair), ``norm``
    80 B, and a ``head`` tied to ``embed``."""

    def __init__(self, layers: int = 12) -> None:
        super().__init__(width=10, layers=layers, vocab=20, block=LinearPair)


class Stack(nn.Module):
    """The given blocks called one after another, held as ``blocks.N`` (or ``<name>.N``)."""

    def __init__(self, blocks: Iterable[nn.Module], *, name: str = "blocks") -> None:
        super().__init__()
        self._held_as = name
        self.add_module(name, nn.ModuleList(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in getattr(self, self._held_as):
            x = block(x)
        return x


class Linears(nn.Module):
    """``layers.N`` (``depth`` square Linears with bias) and a ``norm``; no forward: the
    models of the loading tests that only read and compare weights."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)


class TinyNet(nn.Module):
    """The model the remote tests save and load: an embedding (``rows`` of 16), three blocks
    and a head, so that ``max_shard_size=2500`` gives a sharded checkpoint; ``steps`` > 0 adds
    an int64 buffer ``steps`` (``arange(steps)``)."""

    def __init__(self, rows: int = 40, *, steps: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 40)
        if steps:
            self.register_buffer("steps", torch.arange(steps))
