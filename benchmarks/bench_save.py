"""Save benchmark: bigmodel (durable and not) vs transformers ``save_pretrained`` vs the disk.

    python benchmarks/bench_save.py                 # ~3 GB fp32 Llama-style model, 500 MB shards
    python benchmarks/bench_save.py --size small    # ~300 MB, for a quick look

Each measurement runs in a fresh process that first loads the reference checkpoint (as views
of the page cache, outside the timing), then saves it into a new folder next to the cache
with 500 MB shards, twice: the *first* save of the process, then (after removing the first
one's folder) a *second* save of the same model, as a training job saving periodically does.
Both are reported side by side: in a VM whose free memory is handed back to the host, every
page the first save writes costs a host fault, whatever the method; the second save reuses
pages the guest just freed. ``durable=True`` (bigmodel's default) fsyncs every file and the folder
before and after publishing; ``durable=False`` keeps the atomic publish without fsync;
transformers never fsyncs. The physical limit is ``dd bs=16M conv=fsync`` writing the same
number of bytes to the same filesystem. The output folder is removed after each run.

Before each run, pending writeback is flushed (``sync``) and the methods' order rotates with
every repeat (use a multiple of 3 repeats). The table (medians over ``--repeats`` runs) is printed and written to docs/benchmarks/save.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import (
    SIZES,
    _config,
    common_parser,
    ensure_checkpoint,
    publish_table,
    run_child,
    warm_page_cache,
)

METHODS = ("bigmodel-durable", "bigmodel-fast", "transformers")
GB = 1e9


def child(method: str, folder: Path, out: Path, size: str) -> None:
    from transformers import LlamaForCausalLM

    import bigmodel

    config = _config(size)
    model = bigmodel.from_pretrained(lambda: LlamaForCausalLM(config), folder, progress=False)
    for p in model.parameters():  # the source is in memory (page cache) before timing
        p.sum()
    shard = SIZES[size]["shard"]
    timings = []
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        if method == "transformers":
            model.save_pretrained(out, max_shard_size=shard)
        else:
            durable = method == "bigmodel-durable"
            bigmodel.save_checkpoint(
                model, out, max_shard_size=shard, durable=durable, progress=False
            )
        timings.append(time.perf_counter() - start)
    written = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(json.dumps({"seconds": timings[0], "second_s": timings[1], "bytes": written}))


def raw_write(out: Path, nbytes: int) -> float:
    """Seconds for ``dd`` to write ``nbytes`` with one fsync at the end (conv=fsync)."""
    out.mkdir(parents=True, exist_ok=True)
    block = 16 << 20
    start = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={out / 'raw.bin'}",
            f"bs={block}",
            f"count={max(1, nbytes // block)}",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def main() -> None:
    parser = common_parser(__doc__, "save.md")
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--target", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.target, args.size)
        return

    folder = ensure_checkpoint(args.cache, args.size)
    warm_page_cache(folder)
    nbytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    target = args.cache / f"save-bench-{args.size}"
    results: dict[str, list[float]] = {m: [] for m in METHODS}
    second: dict[str, list[float]] = {m: [] for m in METHODS}
    raw: list[float] = []
    for repeat in range(args.repeats):
        raw.append(raw_write(target, nbytes))
        # Every method starts from the same state: no writeback of an earlier run pending, and
        # each method takes each place in the order in turn (the state a run leaves behind,
        # 3 GB of dirty pages or none, changes the next run's first save by up to 2x).
        for method in METHODS[repeat % len(METHODS) :] + METHODS[: repeat % len(METHODS)]:
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            r = run_child(__file__, method, folder=folder, target=target, size=args.size)
            results[method].append(r["seconds"])
            second[method].append(r["second_s"])
            print(f"  {method:16s} {r['seconds']:.2f}s, then {r['second_s']:.2f}s", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)

    raw_s = statistics.median(raw)
    med = {m: statistics.median(v) for m, v in results.items()}
    med2 = {m: statistics.median(v) for m, v in second.items()}
    publish_table(
        table(args, nbytes, raw_s, med, med2),
        args.out,
        {"bytes": nbytes, "raw_fsync_s": raw_s, "seconds": med, "second_save_seconds": med2},
    )


def table(
    args: argparse.Namespace,
    nbytes: int,
    raw_s: float,
    med: dict[str, float],
    med2: dict[str, float],
) -> list[str]:
    """The markdown of docs/benchmarks/save.md: first and second saves side by side."""
    lines = [
        f"# Save — {args.size} Llama-style model, {nbytes / GB:.2f} GB fp32, {SIZES[args.size]['shard']} shards",
        "",
        f"Medians of {args.repeats} runs, each in a fresh process after a `sync`, the methods' order "
        "rotating with every repeat, source in the page cache. Each "
        "process saves twice: its *first* save, then (after removing that folder) a *second* save "
        f"of the same model. Raw limit: `dd bs=16M conv=fsync` of the same bytes, {raw_s:.2f} s "
        f"({nbytes / raw_s / GB:.2f} GB/s). Command: "
        f"`python benchmarks/bench_save.py --size {args.size} --repeats {args.repeats}`.",
        "",
        "| method | fsync | first save s | GB/s | vs transformers | second save s | GB/s | vs transformers | first save vs raw fsync'd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        fsync = "files + folder" if method == "bigmodel-durable" else "none"
        lines.append(
            f"| {method} | {fsync} | {med[method]:.2f} | {nbytes / med[method] / GB:.2f} | "
            f"{med['transformers'] / med[method]:.2f}x | {med2[method]:.2f} | "
            f"{nbytes / med2[method] / GB:.2f} | {med2['transformers'] / med2[method]:.2f}x | "
            f"{raw_s / med[method] * 100:.0f}% |"
        )
    return [
        *lines,
        "",
        "| target | measured |",
        "|---|---|",
        f"| durable save ≥ 70% of the raw fsync'd write bandwidth (first save) | {raw_s / med['bigmodel-durable'] * 100:.0f}% |",
        f"| durable=False ≥ 1.5x transformers throughput, first save of a process | {med['transformers'] / med['bigmodel-fast']:.2f}x |",
        f"| durable=False ≥ 1.5x transformers throughput, second save of a process | {med2['transformers'] / med2['bigmodel-fast']:.2f}x |",
        "",
        "What costs what (measured with `getrusage` and /proc/vmstat around each save): every "
        "method is kernel time (sys ≈ wall per writing thread; the page-cache copy and page "
        "allocation), with no major faults and a few dozen minor ones, and ~0.74 M pages "
        "allocated per 3 GB. transformers (safetensors ≥ 0.4 writes each tensor from its own "
        "memory) writes in one thread; bigmodel writes shards in 2 threads (2 cores) and hashes "
        "them (xxh3, ~0.2 s of user time per 3 GB, on bytes still in the CPU cache: 4 MiB "
        "write+hash chunks) and preallocates each shard (`fallocate`, KEEP_SIZE). On this VM a "
        "page freed seconds earlier costs a host fault when reused (sys time of the same save "
        "1.4-2.6 s instead of 0.6-1.0 s), and the state the previous run leaves (3 GB dirty or "
        "not) moves the next first save by up to 2x: hence the `sync` before each run and the "
        "rotating order. Single runs still spread widely (transformers 1.0-1.9 s, durable=False "
        "0.7-1.3 s): read the medians, over a multiple of 3 repeats.",
    ]


if __name__ == "__main__":
    main()
