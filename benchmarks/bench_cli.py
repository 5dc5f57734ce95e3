"""How long ``bigmodel inspect`` and ``bigmodel verify`` take on a checkpoint, warm and cold.

Each run is a fresh ``python -m bigmodel`` process (what a user waits for, interpreter start
included). "cold" drops the checkpoint's files from the page cache before each run
(``posix_fadvise(DONTNEED)``, as bench_load.py does); "warm" runs after a first read.

Run: python benchmarks/bench_cli.py [FOLDER] [--repeats 5] [--verify]
(default FOLDER: ~/.cache/bigmodel-bench/llama-large, made by bench_load.py)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import evict_page_cache

DEFAULT = Path.home() / ".cache" / "bigmodel-bench" / "llama-large"


def timed(argv: list[str], *, cold: bool, folder: Path) -> float:
    if cold:
        evict_page_cache(folder)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bigmodel", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verify", action="store_true", help="time verify too (reads every byte)")
    args = parser.parse_args()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    print(f"reference: python -c 'import torch' {time.perf_counter() - start:.2f}s")
    commands = [["inspect", str(args.folder)]]
    if args.verify:
        commands.append(["verify", "-q", str(args.folder)])
    for argv in commands:
        timed(argv, cold=False, folder=args.folder)  # warm the interpreter's own files
        for cold in (False, True):
            runs = [timed(argv, cold=cold, folder=args.folder) for _ in range(args.repeats)]
            print(
                f"bigmodel {argv[0]:8s} {'cold' if cold else 'warm'}: median "
                f"{statistics.median(runs):.3f}s (min {min(runs):.3f}s, max {max(runs):.3f}s, "
                f"{args.repeats} runs)"
            )


if __name__ == "__main__":
    main()
