"""Save a GPT-style model as a sharded Hugging Face checkpoint and load it back two ways.

Run: python examples/quickstart.py [--hidden 512] [--layers 8] [--max-shard-size 20MB]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

import bigmodel


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, num_heads=8, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, stored once

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-shard-size", default="20MB")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.hidden, args.layers).eval()
    ids = torch.randint(0, args.vocab, (2, 16))
    with torch.no_grad():
        expected = model(ids)

    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        saved = bigmodel.save_checkpoint(model, folder, max_shard_size=args.max_shard_size)
        t_save = time.perf_counter() - t0
        print(
            f"saved {saved.total_size / 1e6:.1f} MB into {len(saved.files)} shard(s) in {t_save:.2f}s; tied aliases: {saved.aliases}"
        )

        ckpt = bigmodel.open_checkpoint(folder)
        info = ckpt.tensor_info("blocks.0.mlp.0.weight")
        print(f"{ckpt!r}; blocks.0.mlp.0.weight: {info.dtype} {list(info.shape)} in {info.file}")
        rows = ckpt.get_slice("embed.weight")[:4]
        print(f"first 4 rows of embed.weight read lazily: shape {list(rows.shape)}")

        # Both ways are timed from nothing to a first output: construction, load and one
        # forward pass (a lazy load pays for its reads in the forward; an eager one before it).
        # 1. Built normally (allocate, random init), then every weight copied in.
        t0 = time.perf_counter()
        fresh = TinyGPT(args.vocab, args.hidden, args.layers).eval()
        report = bigmodel.load_sharded_checkpoint(fresh, folder)
        with torch.no_grad():
            out_fresh = fresh(ids)
        t_load = time.perf_counter() - t0
        # 2. Built empty (no allocation, no init), weights mapped from the files.
        t0 = time.perf_counter()
        empty = bigmodel.from_pretrained(
            lambda: TinyGPT(args.vocab, args.hidden, args.layers), folder
        )
        with torch.no_grad():
            out_empty = empty(ids)
        t_meta = time.perf_counter() - t0

        ok = torch.equal(out_fresh, expected) and torch.equal(out_empty, expected)
        print(
            f"built with random init, loaded, first output: {t_load:.2f}s (missing {report.missing_keys}, unexpected {report.unexpected_keys})"
        )
        print(
            f"built empty, weights mapped from the files (from_pretrained), first output: {t_meta:.2f}s; lm_head still tied: {empty.lm_head.weight is empty.embed.weight}"
        )
        print(
            "the empty build skips allocation and random init, and the mapped weights are the page cache itself: pages are read when the forward pass first touches them"
        )
        print("outputs match the original model:", ok)
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
