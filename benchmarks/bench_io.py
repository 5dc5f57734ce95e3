"""The I/O benchmark in one command: loads (warm and cold), saves, and a plot of both.

    python benchmarks/bench_io.py                 # ~3 GB fp32 Llama-style model (a few minutes)
    python benchmarks/bench_io.py --size small    # ~300 MB, for a quick look

Runs ``bench_load.py --cold`` and ``bench_save.py`` (same options), which build the cached
reference checkpoint once and write their tables (markdown and JSON) under docs/benchmarks/,
then draws docs/benchmarks/io.png: load-to-ready time per method (warm and cold cache, fp32
and bf16) and save throughput against the disk's raw fsync'd write bandwidth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_load import common_parser  # noqa: E402


def plot(load: dict, save: dict, out: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = [("warm", "fp32"), ("warm", "bf16"), ("cold", "fp32"), ("cold", "bf16")]
    methods = ["bigmodel", "bigmodel-pread", "transformers", "naive"]
    width = 0.2
    for i, method in enumerate(methods):
        values = [load.get(cache, {}).get(f"{method}/{dtype}", 0.0) for cache, dtype in groups]
        if any(values):
            left.bar(
                [g + (i - 1.5) * width for g in range(len(groups))], values, width, label=method
            )
    if load.get("raw_read_bytes_per_s"):
        floor = load["checkpoint_bytes"] / load["raw_read_bytes_per_s"]
        left.hlines(floor, 1.5, 3.5, colors="k", linestyles="--", label="disk read limit")
    left.set_xticks(range(len(groups)), [f"{c}\n{d}" for c, d in groups])
    left.set_ylabel("seconds to a ready model (lower is better)")
    left.set_title(f"Load {load['checkpoint_bytes'] / 1e9:.1f} GB checkpoint")
    left.set_yscale("log")
    left.legend(fontsize=8)

    gbps = {m: save["bytes"] / s / 1e9 for m, s in save["seconds"].items()}
    gbps["dd conv=fsync (limit)"] = save["bytes"] / save["raw_fsync_s"] / 1e9
    right.barh(list(gbps), list(gbps.values()), color=["C0", "C0", "C2", "0.6"][: len(gbps)])
    right.set_xlabel("GB/s written (higher is better)")
    right.set_title("Save")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = common_parser(__doc__, "io.png")
    args = parser.parse_args()
    docs = args.out.parent
    common = ["--size", args.size, "--repeats", str(args.repeats), "--cache", str(args.cache)]
    for script, table, extra in (
        ("bench_load.py", "load.md", ["--cold"]),
        ("bench_save.py", "save.md", []),
    ):
        subprocess.run(
            [sys.executable, str(HERE / script), *common, *extra, "--out", str(docs / table)],
            check=True,
        )
    load = json.loads((docs / "load.json").read_text())
    save = json.loads((docs / "save.json").read_text())
    plot(load, save, args.out)


if __name__ == "__main__":
    main()
