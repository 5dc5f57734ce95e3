"""Training stall per checkpoint: bigmodel background saves vs synchronous saves vs DCP async_save.

    python benchmarks/bench_train_save.py                  # ~0.5 GB fp32 Llama-style model
    python benchmarks/bench_train_save.py --size tiny      # smoke run

A CPU training loop (AdamW, random tokens) saves the model's state every ``--every`` steps,
in one process, with each method in turn:

* ``bigmodel sync``: ``save_checkpoint(model, folder)`` (durable: fsync'd, atomic commit);
  the loop is blocked for the whole save.
* ``bigmodel background``: ``save_checkpoint(model, folder, background=True)``; the loop is
  blocked while the state is copied into staging memory (and while a previous save is
  still running); the worker writes, hashes, fsyncs and commits while training goes on.
* ``dcp async_save``: ``torch.distributed.checkpoint.async_save`` of the same state dict
  (single process, no process group), its default staging, waited on before the next save.

Reported per method (medians over the saves): the stall (time the loop is blocked by the
save call), the write's wall time (call to durable), and, for background saves, the staging
buffer (bigmodel's own count) and the growth of RssAnon over the run. The ~3 GB model of
the other benchmarks makes one AdamW step take tens of seconds on two cores, so the default
here is a smaller Llama-style model (``--size``); the ratios are what the targets are about.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # hidden, layers, intermediate, vocab: parameters (fp32 bytes)
    "tiny": (64, 2, 128, 256),
    "small": (512, 8, 1408, 8000),  # ~33 M parameters, 0.13 GB
    "medium": (1024, 8, 2816, 16000),  # ~134 M parameters, 0.54 GB
}
METHODS = ("bigmodel sync", "bigmodel background", "dcp async_save")


def _model(size: str) -> torch.nn.Module:
    return llama(*SIZES[size])


def llama(hidden: int, layers: int, inter: int, vocab: int) -> torch.nn.Module:
    """A seeded fp32 Llama-style model of these dimensions (also used by bench_dist_save)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        vocab_size=vocab,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _save(method: str, model: torch.nn.Module, folder: Path):
    """Start one save; returns (something to wait on, a function giving the finish time)."""
    import bigmodel

    if method == "bigmodel sync":
        bigmodel.save_checkpoint(model, folder, progress=False)
        return None
    if method == "bigmodel background":
        return bigmodel.save_checkpoint(model, folder, background=True, progress=False)
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(model.state_dict(), checkpoint_id=str(folder))


def _finished(method: str, pending, stall_end: float) -> float:
    """Wait for ``pending`` and return the moment it was durable (monotonic)."""
    if pending is None:
        return stall_end
    if method == "bigmodel background":
        pending.wait()
        return float(pending.finished_at)
    pending.result()
    return time.monotonic()


def run_method(method: str, size: str, steps: int, every: int, root: Path) -> dict[str, float]:
    model = _model(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SIZES[size][3], (2, 128), generator=torch.Generator().manual_seed(0))
    stalls: list[float] = []
    writes: list[float] = []
    step_times: list[float] = []
    pending = None
    start_of_pending = 0.0
    rss0 = _rss_anon()
    peak_rss = rss0
    for step in range(1, steps + 1):
        t0 = time.monotonic()
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.monotonic() - t0)
        if step == 1:  # the baseline holds the gradients and the optimizer state
            rss0 = peak_rss = _rss_anon()
        peak_rss = max(peak_rss, _rss_anon())
        if step % every:
            continue
        if pending is not None:  # the previous save must be done before the next starts
            writes.append(_finished(method, pending, 0.0) - start_of_pending)
        folder = root / method.replace(" ", "-") / f"step-{step}"
        call = time.monotonic()
        pending = _save(method, model, folder)
        stall_end = time.monotonic()
        stalls.append(stall_end - call)
        start_of_pending = call
        if pending is None:
            writes.append(stall_end - call)
        peak_rss = max(peak_rss, _rss_anon())
    if pending is not None:
        writes.append(_finished(method, pending, 0.0) - start_of_pending)
    saved = sum(t.nbytes for t in model.state_dict().values())
    return {
        "stall": statistics.median(stalls),
        "write": statistics.median(writes),
        "step": statistics.median(step_times),
        "saved_bytes": saved,
        "rss_growth": peak_rss - rss0,
    }


def _staging_bytes() -> int:
    from bigmodel.execution.background import staging_peak_bytes

    return staging_peak_bytes()


def table(results: dict[str, dict[str, float]], size: str, staging: int) -> str:
    sync, bg, dcp = (results[m] for m in METHODS)
    gb = 1e9
    lines = [
        f"Model: Llama-style `{size}` {SIZES[size]} (hidden, layers, intermediate, vocab), fp32, "
        f"{sync['saved_bytes'] / gb:.3f} GB saved per checkpoint; AdamW step "
        f"{sync['step']:.2f} s (median).",
        "",
        "| method | stall per save (s) | write, call to durable (s) |",
        "|---|---|---|",
    ]
    for method in METHODS:
        r = results[method]
        lines.append(f"| {method} | {r['stall']:.3f} | {r['write']:.3f} |")
    lines += [
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        f"| background stall / sync save stall | {bg['stall'] / sync['stall']:.3f} | <= 0.10 |",
        f"| background stall / dcp async_save stall | {bg['stall'] / dcp['stall']:.3f} | (report) |",
        f"| background write / sync save | {bg['write'] / sync['write']:.2f} | <= 1.3 |",
        f"| staging buffer / saved bytes | {staging / sync['saved_bytes']:.2f} | <= 1.0 |",
        f"| RssAnon growth after the first step, background run / saved bytes | "
        f"{bg['rss_growth'] / sync['saved_bytes']:.2f} | (report) |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="where checkpoints go (a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/train_save.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-train-save-", dir=args.root))
    results = {}
    try:
        for method in METHODS:
            results[method] = run_method(method, args.size, args.steps, args.every, root)
            shutil.rmtree(root / method.replace(" ", "-"), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = table(results, args.size, _staging_bytes())
    command = f"python benchmarks/bench_train_save.py --size {args.size} --steps {args.steps} --every {args.every}"
    doc = f"# Training stall per checkpoint\n\n`{command}` (one process, 2 shared CPU cores)\n\n{text}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
