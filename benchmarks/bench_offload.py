"""Offload benchmark: a model bigger than its CPU budget, bigmodel vs accelerate, side by side.

    python benchmarks/bench_offload.py                 # ~3 GB fp32 checkpoint -> bf16, cpu=1GB, rest on disk
    python benchmarks/bench_offload.py --size small --budget 100MB

The bench_load reference checkpoint is loaded as bfloat16 with ``max_memory={"cpu": BUDGET}``
and the rest offloaded to disk, with bigmodel (``from_pretrained(..., device_map="auto")``)
and with accelerate (``init_empty_weights`` + ``load_checkpoint_and_dispatch``), each in a
fresh process: time to a dispatched model, first forward, steady-state forward (median of
3) on 64 tokens, peak RssAnon, and whether the logits match the in-memory bf16 model.
Writes docs/benchmarks/offload.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import (
    _config,
    common_parser,
    ensure_checkpoint,
    publish_table,
    run_child,
    warm_page_cache,
)

METHODS = ("bigmodel", "accelerate", "in-memory")


def child(method: str, folder: Path, size: str, budget: str, out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    import bigmodel
    from bigmodel.foundations.memory import MemorySampler

    config = _config(size)
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with bigmodel.init_empty_weights():  # warm up lazy imports outside the timing
        LlamaForCausalLM(_config("tiny"))
    with tempfile.TemporaryDirectory() as offload, MemorySampler() as mem:
        start = time.perf_counter()
        if method == "bigmodel":
            model = bigmodel.from_pretrained(
                lambda: LlamaForCausalLM(config),
                folder,
                dtype=torch.bfloat16,
                device_map="auto",
                max_memory={"cpu": budget, "disk": None},
                offload_folder=offload,
                progress=False,
            )
        elif method == "accelerate":
            from accelerate import init_empty_weights, load_checkpoint_and_dispatch

            with init_empty_weights():
                model = LlamaForCausalLM(config)
            model = load_checkpoint_and_dispatch(
                model,
                str(folder),
                device_map="auto",
                max_memory={"cpu": budget},
                offload_folder=offload,
                dtype=torch.bfloat16,
                no_split_module_classes=["LlamaDecoderLayer"],
            )
        else:
            model = bigmodel.from_pretrained(
                lambda: LlamaForCausalLM(config), folder, dtype=torch.bfloat16, progress=False
            )
        model.eval()
        dispatched = time.perf_counter() - start
        times = []
        with torch.no_grad():
            for _ in range(4):
                t = time.perf_counter()
                logits = model(ids).logits
                times.append(time.perf_counter() - t)
    torch.save(logits, out)
    print(
        json.dumps(
            {
                "dispatch_s": dispatched,
                "first_s": times[0],
                "steady_s": statistics.median(times[1:]),
                "anon": mem.increase("anon"),
            }
        )
    )


def main() -> None:
    parser = common_parser(__doc__, "offload.md")
    parser.add_argument("--budget", default="1GB", help="CPU budget (default 1GB)")
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--logits", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.size, args.budget, args.logits)
        return

    import torch

    import bigmodel

    folder = ensure_checkpoint(args.cache, args.size)
    warm_page_cache(folder)
    budget = bigmodel.parse_size(args.budget)
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for method in METHODS:
                logits = Path(tmp) / f"{method}.pt"
                runs.setdefault(method, []).append(
                    run_child(
                        __file__,
                        method,
                        folder=folder,
                        size=args.size,
                        budget=args.budget,
                        logits=logits,
                    )
                )
                print(f"  {method:10s} {runs[method][-1]}", file=sys.stderr)
        reference = torch.load(Path(tmp) / "in-memory.pt")
        match = {m: torch.equal(torch.load(Path(tmp) / f"{m}.pt"), reference) for m in METHODS}
        close = {
            m: torch.allclose(
                torch.load(Path(tmp) / f"{m}.pt").float(), reference.float(), atol=1e-2
            )
            for m in METHODS
        }

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors")) // 2
    lines = [
        f"# Offload — {args.size} checkpoint as bf16 ({model_bytes / 1e9:.2f} GB), cpu budget {args.budget}, rest on disk",
        "",
        f"Medians of {args.repeats} runs in fresh processes, warm page cache, 64-token forward on CPU. "
        f"Command: `python benchmarks/bench_offload.py --size {args.size} --budget {args.budget}`.",
        "",
        "| method | to dispatched s | first forward s | steady forward s | peak RssAnon GB | logits equal in-memory |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        same = "identical" if match[m] else ("allclose" if close[m] else "DIFFERENT")
        lines.append(
            f"| {m} | {med(m, 'dispatch_s'):.2f} | {med(m, 'first_s'):.2f} | {med(m, 'steady_s'):.2f} | {med(m, 'anon') / 1e9:.2f} | {same} |"
        )
    lines += [
        "",
        "| target | measured |",
        "|---|---|",
        f"| dispatch time ≤ 0.2x accelerate | {med('bigmodel', 'dispatch_s') / med('accelerate', 'dispatch_s'):.2f}x |",
        f"| steady forward ≤ 0.7x accelerate | {med('bigmodel', 'steady_s') / med('accelerate', 'steady_s'):.2f}x |",
        f"| peak RssAnon ≤ budget + 2 blocks + 0.1 GB | bigmodel {med('bigmodel', 'anon') / 1e9:.2f} GB, accelerate {med('accelerate', 'anon') / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB |",
    ]
    publish_table(lines, args.out)


if __name__ == "__main__":
    main()
