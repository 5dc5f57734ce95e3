"""Original-layout MoE checkpoint into the transformers 5 class: bigmodel vs from_pretrained.

    python benchmarks/bench_convert.py                 # ~2 GB Mixtral-style checkpoint, fp32
    python benchmarks/bench_convert.py --size tiny --repeats 1

The checkpoint is written by transformers' ``save_pretrained`` in its default (original)
layout: one tensor per expert (``experts.{i}.w1/w2/w3``), which the transformers 5 class fuses
at load time into 3-D ``gate_up_proj``/``down_proj`` tensors. Each method loads it in a fresh
process, warm page cache: bigmodel (``from_pretrained`` of the class, which runs the model's
conversions inside its own plan) and transformers (``MixtralForCausalLM.from_pretrained``).
"Ready" is the load plus one read of every parameter (its sum), so a lazy load pays for its
page faults. Reported: ready time, peak increase of private (anonymous) memory during the
load, and the memory target: the final model's private bytes (the fused tensors; the others stay views of
the file) + the largest fused tensor + 0.1 GB. Writes docs/benchmarks/convert.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import common_parser, publish_table, run_child, warm_page_cache

METHODS = ("bigmodel", "transformers")
#: hidden, expert intermediate, layers, experts, vocab -> about 2.0 GB / 3 MB of float32
SIZES = {
    "large": {"hidden": 1024, "inter": 1024, "layers": 15, "experts": 8, "vocab": 32000},
    "small": {"hidden": 256, "inter": 256, "layers": 4, "experts": 4, "vocab": 4096},
    "tiny": {"hidden": 64, "inter": 64, "layers": 2, "experts": 4, "vocab": 256},
}


def _config(size: str):  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig

    s = SIZES[size]
    return MixtralConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=8 if s["hidden"] >= 256 else 2,
        num_key_value_heads=2 if s["hidden"] >= 256 else 1,
        num_local_experts=s["experts"],
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )


def ensure_checkpoint(cache: Path, size: str) -> Path:
    folder = cache / f"mixtral-original-{size}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import MixtralForCausalLM

    print(f"building the {size} original-layout checkpoint in {folder} (once)...", file=sys.stderr)
    torch.manual_seed(0)
    MixtralForCausalLM(_config(size)).save_pretrained(folder, max_shard_size="500MB")
    return folder


def child(method: str, folder: Path, size: str) -> None:
    import torch
    from transformers import MixtralForCausalLM

    import bigmodel
    from bigmodel.foundations.memory import MemorySampler

    config = _config(size)
    with bigmodel.init_empty_weights():  # warm up lazy imports outside the timing
        MixtralForCausalLM(_config("tiny"))
    with MemorySampler() as mem:  # the load alone: the memory target applies to it
        start = time.perf_counter()
        if method == "bigmodel":
            model = bigmodel.from_pretrained(
                lambda: MixtralForCausalLM(config), folder, progress=False
            )
        else:
            model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
        loaded = time.perf_counter() - start
    with torch.no_grad():  # then one read of every parameter: lazy pages are paid here
        checksum = sum(float(p.sum(dtype=torch.float64)) for p in model.parameters())
    ready = time.perf_counter() - start
    fused = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    print(
        json.dumps(
            {
                "load_s": loaded,
                "ready_s": ready,
                "anon": mem.increase("anon"),
                "checksum": checksum,
                "fused_bytes": sum(p.numel() * p.element_size() for p in fused),
                "largest_fused": max(p.numel() * p.element_size() for p in fused),
            }
        )
    )


def main() -> None:
    parser = common_parser(__doc__, "convert.md")
    parser.set_defaults(size="large")
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    if args.size not in SIZES:
        parser.error(f"--size must be one of {', '.join(SIZES)}")
    if args.child:
        child(args.child, args.folder, args.size)
        return
    folder = ensure_checkpoint(args.cache, args.size)
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    warm_page_cache(folder)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            r = run_child(__file__, method, folder=folder, size=args.size)
            results[method].append(r)
            print(
                f"  {method:12s} ready {r['ready_s']:.2f}s anon {r['anon'] / 1e9:.2f} GB",
                file=sys.stderr,
            )
    publish_table(_table(args, results, ckpt_bytes), args.out, _medians(results))


def _medians(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}


def _table(args, results, ckpt_bytes: int) -> list[str]:  # type: ignore[no-untyped-def]
    med = _medians(results)
    ours, theirs = med["bigmodel"], med["transformers"]
    same = len({round(r["checksum"], 3) for rs in results.values() for r in rs}) == 1
    target = ours["fused_bytes"] + ours["largest_fused"] + 0.1e9
    lines = [
        f"# Original-layout MoE checkpoint into the transformers 5 class — {args.size}, {ckpt_bytes / 1e9:.2f} GB fp32",
        "",
        f"Mixtral-style model saved by `save_pretrained` (one tensor per expert), loaded into `MixtralForCausalLM`, "
        f"whose experts are fused 3-D tensors. Warm page cache, medians of {args.repeats} runs, each in a fresh process; "
        f"memory is the peak increase of private (anonymous) memory during the load. Command: `python benchmarks/bench_convert.py --size {args.size}`.",
        "",
        "| method | load s | ready s | peak RssAnon GB |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        m = med[method]
        lines.append(
            f"| {method} | {m['load_s']:.2f} | {m['ready_s']:.2f} | {m['anon'] / 1e9:.2f} |"
        )
    lines += [
        "",
        f"Same weights in every run (parameter checksums equal): {'yes' if same else 'NO'}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| ready time ≤ 1.0x transformers | {ours['ready_s'] / theirs['ready_s']:.2f}x | {'yes' if ours['ready_s'] <= theirs['ready_s'] else 'no'} |",
        f"| peak RssAnon ≤ fused tensors ({ours['fused_bytes'] / 1e9:.2f} GB) + largest fused tensor "
        f"({ours['largest_fused'] / 1e9:.2f} GB) + 0.1 GB = {target / 1e9:.2f} GB | {ours['anon'] / 1e9:.2f} GB | "
        f"{'yes' if ours['anon'] <= target else 'no'} |",
    ]
    return lines


if __name__ == "__main__":
    main()
