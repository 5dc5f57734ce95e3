"""Load-to-ready from a URL: bigmodel over local HTTP vs a plain parallel ranged GET of the same
bytes (same client, same server) vs "download the folder, then load it".

    python benchmarks/bench_remote.py --folder ~/.cache/bigmodel-bench/llama-large  # ~3 GB
    python benchmarks/bench_remote.py                  # ~3 GB fp32 stack of Linear layers
    python benchmarks/bench_remote.py --gb 0.5         # a quick look

``--folder`` serves an existing Hugging Face checkpoint (its ``config.json`` builds the model
with transformers, on ``meta``); without it a stack of Linear layers (fp32) is written once
into ``--cache``. The test
HTTP server of ``tests/_remote_servers.py`` (threaded, ``sendfile``) serves it on localhost.
Each measurement runs in a fresh subprocess; "ready" means every parameter was summed once.
Memory: peak RssAnon of the loading process (sampled every 5 ms), as an increase over the
process before the load, next to the final model and the in-flight bound. Results are printed
as a markdown table (append them to docs/benchmarks/remote.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

WIDTH = 4096  # one Linear(4096, 4096) is 64 MiB of fp32


def _model(layers: int):
    from torch import nn

    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))


def _layers(gb: float) -> int:
    return max(1, round(gb * 1e9 / (WIDTH * WIDTH * 4)))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak RssAnon above the value when started, sampled in a thread."""

    def __init__(self) -> None:
        self.base = _rss_anon()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon() - self.base)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon() - self.base)


def _build(layers: int, config: str):
    """The model to load into: from ``config`` (a folder with config.json) when given."""
    if config:
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    return _model(layers)


def child(kind: str, url: str, layers: int, dtype: str, tmp: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import obstore
    import torch
    from obstore.store import from_url

    import bigmodel
    from bigmodel import RemoteOptions

    peak = Peak()
    start = time.perf_counter()
    nbytes = 0
    if kind == "ranged-get":  # the same client, the same 16 MiB ranges, 16 threads
        from concurrent.futures import ThreadPoolExecutor

        store = from_url(url, client_options={"allow_http": True})
        files = [f for f in json.loads(os.environ["BENCH_FILES"])]
        opts = RemoteOptions()
        jobs = []
        for name, size in files:
            jobs += [
                (name, s, min(s + opts.chunk_bytes, size)) for s in range(0, size, opts.chunk_bytes)
            ]

        def get(job: tuple[str, int, int]) -> int:
            return len(obstore.get_range(store, job[0], start=job[1], end=job[2]))

        with ThreadPoolExecutor(opts.threads) as pool:
            nbytes = sum(pool.map(get, jobs))
    else:
        with bigmodel.init_empty_weights():
            model = _build(layers, os.environ.get("BENCH_CONFIG", ""))
        built = time.perf_counter() - start
        source = url
        remote = None
        if kind.startswith("cached"):  # the cache was filled by the "cache-fill" run
            remote = RemoteOptions(cache_dir=Path(os.environ["BENCH_CACHE"]))
        if kind == "download-then-load":
            store = from_url(url, client_options={"allow_http": True})
            for name, _ in json.loads(os.environ["BENCH_FILES"]):
                with open(Path(tmp) / name, "wb") as fh:
                    for chunk in obstore.get(store, name).stream(min_chunk_size=16 * 2**20):
                        fh.write(chunk)
            source = tmp
        if kind == "cache-fill":
            remote = RemoteOptions(cache_dir=Path(os.environ["BENCH_CACHE"]))
        bigmodel.load_checkpoint(model, source, dtype=getattr(torch, dtype), remote=remote)
        for p in model.parameters():
            p.sum()  # ready: every parameter read once
            nbytes += p.nbytes
    seconds = time.perf_counter() - start
    if kind == "ranged-get":
        built = 0.0
    return {"seconds": seconds, "build": built, "bytes": nbytes, "peak_anon": peak.stop()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bigmodel-bench")
    parser.add_argument("--folder", type=Path, help="serve this Hugging Face checkpoint")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, url, layers, dtype, tmp = args.child
        print(json.dumps(child(kind, url, int(layers), dtype, tmp)))
        return
    import tempfile

    import torch

    import bigmodel
    from _remote_servers import http_server

    layers = _layers(args.gb)
    folder = args.folder or args.cache / f"remote-{layers}x{WIDTH}"
    if args.folder is None and not (folder / "model.safetensors.index.json").exists():
        torch.manual_seed(0)
        bigmodel.save_checkpoint(_model(layers), folder, max_shard_size="500MB")
    files = sorted(
        (p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix == ".safetensors"
    )
    total = sum(s for _, s in files)
    rows = []
    with http_server(folder) as srv, tempfile.TemporaryDirectory(dir=args.cache) as cache:
        env = {
            **os.environ,
            "BENCH_FILES": json.dumps(files),
            "BENCH_CONFIG": str(folder) if args.folder else "",
            "BENCH_CACHE": cache,
        }
        for kind, dtype in [
            ("ranged-get", "float32"),
            ("bigmodel", "float32"),
            ("bigmodel", "bfloat16"),
            ("download-then-load", "float32"),
            ("cache-fill", "float32"),
            ("cached", "float32"),
        ]:
            with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
                if kind == "download-then-load":
                    for name in ("model.safetensors.index.json", "config.json"):
                        if (folder / name).exists():
                            (Path(tmp) / name).write_bytes((folder / name).read_bytes())
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, srv.url(), str(layers), dtype, tmp],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            final = total if dtype == "float32" else total // 2
            rows.append(
                (
                    kind,
                    dtype,
                    result["seconds"],
                    result["seconds"] - result["build"],
                    total / (result["seconds"] - result["build"]) / 2**30,
                    result["peak_anon"] / 1e9,
                    final / 1e9,
                )
            )
    print(
        f"\n{len(files)} shards, {total / 1e9:.2f} GB over http://127.0.0.1 (test server), {os.cpu_count()} CPUs\n"
    )
    print(
        "| run | dtype | seconds | seconds without building the model | GiB/s of checkpoint "
        "(without building) | peak RssAnon GB | final model GB |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, dtype, s, io, gbs, anon, final in rows:
        print(
            f"| {kind} | {dtype} | {s:.2f} | {io:.2f} | {gbs:.2f} | {anon:.2f} | {final if kind != 'ranged-get' else 0:.2f} |"
        )


if __name__ == "__main__":
    main()
