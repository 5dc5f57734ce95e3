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
process once the model is built on ``meta`` (the load's own memory), next to the final model
and the in-flight bound. The ranged GETs are the reference of the throughput target: the same
16 MiB ranges and 16 threads, with ``http.client`` (the client of bigmodel's HTTP data path,
see ``storage/remote_http.py``) and with obstore (the client of everything else). Results are
printed as the markdown table and target lines of docs/benchmarks/remote.md.
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


def _ranged_get_obstore(url: str, jobs: list[tuple[str, int, int]], threads: int) -> int:
    """Every range with obstore's ``get_range``, the response dropped."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore
    from obstore.store import from_url

    store = from_url(url, client_options={"allow_http": True})

    def get(job: tuple[str, int, int]) -> int:
        return len(obstore.get_range(store, job[0], start=job[1], end=job[2]))

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(get, jobs))


def _ranged_get_http(url: str, jobs: list[tuple[str, int, int]], threads: int) -> int:
    """Every range with ``http.client`` (persistent connections, ``readinto`` one reused
    buffer per thread): the client of bigmodel's HTTP data path, the bytes dropped."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    local = threading.local()

    def get(job: tuple[str, int, int]) -> int:
        name, start, end = job
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port)
            local.buf = memoryview(bytearray(end - start))
        local.conn.request(
            "GET", f"{parts.path}/{name}", headers={"Range": f"bytes={start}-{end - 1}"}
        )
        response = local.conn.getresponse()
        got = 0
        while got < end - start:
            got += response.readinto(local.buf[: end - start - got]) or 0
        return got

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(get, jobs))


def _download(url: str, tmp: str) -> None:
    import obstore
    from obstore.store import from_url

    store = from_url(url, client_options={"allow_http": True})
    for name, _ in json.loads(os.environ["BENCH_FILES"]):
        with open(Path(tmp) / name, "wb") as fh:
            for chunk in obstore.get(store, name).stream(min_chunk_size=16 * 2**20):
                fh.write(chunk)


def child(kind: str, url: str, layers: int, dtype: str, tmp: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch

    import bigmodel
    from bigmodel import RemoteOptions

    start = time.perf_counter()
    if kind.startswith("ranged-get"):  # the same 16 MiB ranges, 16 threads
        opts = RemoteOptions()
        jobs = [
            (name, s, min(s + opts.chunk_bytes, size))
            for name, size in json.loads(os.environ["BENCH_FILES"])
            for s in range(0, size, opts.chunk_bytes)
        ]
        peak = Peak()
        get = _ranged_get_http if kind == "ranged-get-http" else _ranged_get_obstore
        nbytes = get(url, jobs, opts.threads)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "build": 0.0, "bytes": nbytes, "peak_anon": peak.stop()}
    with bigmodel.init_empty_weights():
        model = _build(layers, os.environ.get("BENCH_CONFIG", ""))
    built = time.perf_counter() - start
    peak = Peak()  # the load's memory: the model on meta holds none
    source, remote = url, None
    if kind.startswith("cache"):  # "cache-fill" fills it, "cached" reuses it
        remote = RemoteOptions(cache_dir=Path(os.environ["BENCH_CACHE"]))
    if kind == "download-then-load":
        _download(url, tmp)
        source = tmp
    offload: dict[str, object] = {}
    if kind == "disk-offload":  # about 40 % of the model on "disk", written once into tmp
        total = sum(size for _, size in json.loads(os.environ["BENCH_FILES"]))
        offload = {
            "device_map": "auto",
            "max_memory": {"cpu": int(total * 0.6)},
            "offload_folder": tmp,
        }
    bigmodel.load_checkpoint(
        model,
        source,
        dtype=getattr(torch, dtype),
        remote=remote,
        **offload,  # type: ignore[arg-type]
    )
    loaded = time.perf_counter() - start
    nbytes = 0
    for p in model.parameters():
        if not p.is_meta:  # an offloaded parameter lives in the offload folder
            p.sum()  # ready: every resident parameter read once
            nbytes += p.nbytes
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "build": built,
        "loaded": loaded,
        "bytes": nbytes,
        "peak_anon": peak.stop(),
    }


#: (row label, kind, dtype, extra environment)
RUNS = [
    (
        "ranged GET of every byte, http.client (readinto a reused buffer)",
        "ranged-get-http",
        "float32",
        {},
    ),
    ("ranged GET of every byte, obstore (response dropped)", "ranged-get-obstore", "float32", {}),
    ('bigmodel `load_checkpoint(model, "http://...")`', "bigmodel", "float32", {}),
    ("bigmodel, cast on the way", "bigmodel", "bfloat16", {}),
    (
        "bigmodel through obstore only (`BIGMODEL_REMOTE_CLIENT=obstore`, as for s3://)",
        "bigmodel-obstore",
        "float32",
        {"BIGMODEL_REMOTE_CLIENT": "obstore"},
    ),
    (
        "the same, cast on the way",
        "bigmodel-obstore",
        "bfloat16",
        {"BIGMODEL_REMOTE_CLIENT": "obstore"},
    ),
    (
        'bigmodel, about 40 % on "disk" (`device_map="auto"`, CPU budget 60 %, `offload_folder`)',
        "disk-offload",
        "float32",
        {},
    ),
    (
        "download the folder (obstore, streamed to disk), then load it",
        "download-then-load",
        "float32",
        {},
    ),
    (
        "bigmodel with `RemoteOptions(cache_dir=...)`, empty cache (fills it)",
        "cache-fill",
        "float32",
        {},
    ),
    (
        "the same, second load (every shard from the cache, no range request)",
        "cached",
        "float32",
        {},
    ),
]


def _run(
    srv: object, folder: Path, args: argparse.Namespace, layers: int, env: dict[str, str]
) -> list[dict[str, object]]:
    """Every row of :data:`RUNS`, each in a fresh process."""
    import tempfile

    rows = []
    for label, kind, dtype, extra in RUNS:
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            if kind == "download-then-load":
                for name in ("model.safetensors.index.json", "config.json"):
                    if (folder / name).exists():
                        (Path(tmp) / name).write_bytes((folder / name).read_bytes())
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, srv.url(), str(layers), dtype, tmp],  # type: ignore[attr-defined]
                capture_output=True,
                text=True,
                env={**env, **extra},
                check=True,
            )
        rows.append(
            {
                "label": label,
                "kind": kind,
                "dtype": dtype,
                **json.loads(out.stdout.strip().splitlines()[-1]),
            }
        )
    return rows


def _table(rows: list[dict[str, object]], total: int, files: int, inflight: int) -> str:
    """The markdown table and the targets, as docs/benchmarks/remote.md shows them."""
    lines = [
        f"{files} shards, {total / 1e9:.2f} GB over http://127.0.0.1 (test server), {os.cpu_count()} CPUs",
        "",
        "| run | dtype | seconds | seconds without building the model | of which the sum of every parameter | GiB/s (without building) | peak RssAnon GB | final model GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds, built = float(row["seconds"]), float(row["build"])  # type: ignore[arg-type]
        io = seconds - built
        final = (
            "—"
            if str(row["kind"]).startswith("ranged-get")
            else f"{total / (1 if row['dtype'] == 'float32' else 2) / 1e9:.2f}"
        )
        if row["kind"] == "disk-offload":
            final = f"{float(row['bytes']) / 1e9:.2f} resident"  # type: ignore[arg-type]
        anon = float(row["peak_anon"]) / 1e9  # type: ignore[arg-type]
        ready = f"{seconds - float(row['loaded']):.2f}" if "loaded" in row else "—"  # type: ignore[arg-type]
        lines.append(
            f"| {row['label']} | {row['dtype']} | {seconds:.2f} | {io:.2f} | {ready} | {total / io / 2**30:.2f} | {anon:.2f} | {final} |"
        )
        row["io"], row["anon"] = io, anon
    by = {(r["kind"], r["dtype"]): r for r in rows}
    load, load16 = by[("bigmodel", "float32")], by[("bigmodel", "bfloat16")]
    get_http, get_obstore = (
        by[("ranged-get-http", "float32")],
        by[("ranged-get-obstore", "float32")],
    )
    download = by[("download-then-load", "float32")]
    bound = inflight / 1e9 + 0.1
    lines += [
        "",
        f"- vs a plain parallel ranged GET, same client (http.client): {float(get_http['io']) / float(load['io']):.0%} of its throughput; vs obstore's ranged GET: {float(get_obstore['io']) / float(load['io']):.0%} (target >= 80%); before the sum of every parameter: {float(get_http['io']) / (float(load['loaded']) - float(load['build'])):.0%} / {float(get_obstore['io']) / (float(load['loaded']) - float(load['build'])):.0%}",
        f"- vs download the folder, then load it: {float(load['io']) / float(download['io']):.2f}x without building the model, {float(load['seconds']) / float(download['seconds']):.2f}x with it (target <= 0.5x)",
        f"- memory fp32: {float(load['anon']):.2f} GB vs final {total / 1e9:.2f} + in-flight {inflight / 1e9:.2f} + 0.1 = {total / 1e9 + bound:.2f} GB",
        f"- memory bf16: {float(load16['anon']):.2f} GB vs final {total / 2e9:.2f} + in-flight {inflight / 1e9:.2f} + 0.1 = {total / 2e9 + bound:.2f} GB",
    ]
    for key, label in (
        (("bigmodel-obstore", "float32"), "fp32"),
        (("bigmodel-obstore", "bfloat16"), "bf16"),
    ):
        if key in by:
            final = total / (1 if label == "fp32" else 2) / 1e9
            lines.append(
                f"- memory {label} through obstore only: {float(by[key]['anon']):.2f} GB vs {final + bound:.2f} GB"
            )
    if ("disk-offload", "float32") in by:
        row = by[("disk-offload", "float32")]
        resident = float(row["bytes"]) / 1e9  # type: ignore[arg-type]
        lines.append(
            f"- memory with disk offload: {float(row['anon']):.2f} GB vs resident {resident:.2f} + in-flight {inflight / 1e9:.2f} + 0.1 = {resident + bound:.2f} GB"
        )
    return "\n".join(lines)


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
    with http_server(folder) as srv, tempfile.TemporaryDirectory(dir=args.cache) as cache:
        env = {
            **os.environ,
            "BENCH_FILES": json.dumps(files),
            "BENCH_CONFIG": str(folder) if args.folder else "",
            "BENCH_CACHE": cache,
        }
        env.pop("BIGMODEL_REMOTE_CLIENT", None)
        rows = _run(srv, folder, args, layers, env)
    print()
    print(_table(rows, total, len(files), bigmodel.IOOptions().inflight))


if __name__ == "__main__":
    main()
