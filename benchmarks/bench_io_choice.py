"""Which read path a load should take on each filesystem: what ``io="auto"`` picks, measured
against both paths, cold and warm.

    python benchmarks/bench_io_choice.py                  # ~300 MB checkpoint (a few minutes)
    python benchmarks/bench_io_choice.py --size large     # ~3 GB
    python benchmarks/bench_io_choice.py --latency-ms 1   # round trips to emulate (0.25 1)

``load_checkpoint(model, folder, io=...)`` reads a local checkpoint either through the file
mapping (``"mmap"``: made resident in order by a background thread, zero copy) or with parallel
``pread`` calls into private memory (``"pread"``); ``"auto"`` picks pread on network and FUSE
filesystems and the mapping elsewhere (``bigmodel.storage.pread.pick_io``). This benchmark puts
the same checkpoint behind each filesystem it can mount here and times both paths:

* **local disk**: the cached checkpoint folder itself;
* **FUSE, C passthrough**: the folder mounted with ``bindfs`` (a FUSE filesystem that adds only
  the user-space round trip); skipped unless ``bindfs`` and ``/dev/fuse`` are usable;
* **FUSE, N ms per request**: the folder served by a small FUSE filesystem (``mfusepy``) that
  waits ``--latency-ms`` before answering each read request (one row per value), as a network
  filesystem's round trip does (requests in flight overlap, as they do on a network); skipped unless ``mfusepy``
  is importable (``pip install mfusepy``) and FUSE is usable.

Each measurement runs in a fresh process, after the same untimed plain read of the checkpoint
(``bench_load.settle_memory``): the model is built under ``init_empty_weights``, the page cache
is emptied (the mount's and the backing files', right before the timing; cold) or
the files read once through the mount first (warm), then the load runs and every page of every
weight is read once ("ready", as in ``bench_load.py``). The table (medians over ``--repeats``)
says, per filesystem, what ``auto`` picks and whether that was the faster path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_load import (  # noqa: E402
    _config,
    common_parser,
    ensure_checkpoint,
    evict_page_cache,
    publish_table,
    run_child,
    settle_memory,
    touch_pages,
)

IO_PATHS = ("mmap", "pread")
#: Paths whose medians are this close count as a tie (this VM's run-to-run spread is wider).
TIE = 0.05


# -- the latency-adding FUSE filesystem (a child process: ``--serve ROOT MOUNT LATENCY``) ----------
def serve(root: Path, mount: Path, latency: float) -> None:
    """Serve ``root`` read-only at ``mount``, waiting ``latency`` seconds before answering each
    read request (many threads: requests in flight overlap, as on a network)."""
    import errno

    from mfusepy import FUSE, FuseOSError, Operations

    class Delayed(Operations):  # type: ignore[misc]
        use_ns = True

        def _real(self, path: str) -> str:
            return str(root / path.lstrip("/"))

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            try:
                st = os.lstat(self._real(path))
            except OSError as exc:
                raise FuseOSError(exc.errno or errno.ENOENT) from exc
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid")
            return {
                **{k: getattr(st, k) for k in keys},
                **{k: getattr(st, k) for k in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")},
            }

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._real(path))]

        def open(self, path: str, flags: int) -> int:
            return os.open(self._real(path), os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            time.sleep(latency)
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    FUSE(Delayed(), str(mount), foreground=True, nothreads=False, ro=True)


@contextlib.contextmanager
def mounted(kind: str, root: Path, mount: Path, latency_ms: float) -> Iterator[str | None]:
    """Mount ``root`` at ``mount`` (``kind``: "bindfs" or "delayed"); yields None when mounted,
    else why it was skipped. Unmounts on the way out."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        yield "/dev/fuse is not usable here"
        return
    mount.mkdir(parents=True, exist_ok=True)
    if kind == "bindfs":
        if shutil.which("bindfs") is None:
            yield "`bindfs` is not installed"
            return
        proc = subprocess.Popen(["bindfs", "-f", "--no-allow-other", str(root), str(mount)])
    else:
        import importlib.util

        if importlib.util.find_spec("mfusepy") is None:
            yield "`mfusepy` is not importable"
            return
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root), str(mount), str(latency_ms / 1e3)]
        )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mount):
            if proc.poll() is not None or time.monotonic() > deadline:
                yield f"mounting with {kind} failed (exit status {proc.poll()})"
                return
            time.sleep(0.05)
        yield None
    finally:
        subprocess.run(["fusermount", "-u", str(mount)], capture_output=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- one measurement (a child process) -------------------------------------------------------------
def measure_child(folder: Path, backing: Path, io: str, size: str, warm: bool) -> None:
    """Time one load of ``folder`` with ``io`` to a ready model (every page read)."""
    from transformers import LlamaForCausalLM

    import bigmodel
    from bigmodel.storage.pread import pick_io

    with bigmodel.init_empty_weights():  # torch's lazy imports, outside the timing
        LlamaForCausalLM(_config("small"))
    bigmodel.load_checkpoint  # noqa: B018 - resolves the lazy import outside the timing
    if warm:
        for path in sorted(folder.iterdir()):
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass
    else:
        evict_page_cache(folder)
        if backing != folder:
            evict_page_cache(backing)
    start = time.perf_counter()
    with bigmodel.init_empty_weights():
        model = LlamaForCausalLM(_config(size))
    bigmodel.load_checkpoint(model, folder, io=io, progress=False)
    loaded = time.perf_counter() - start
    touch_pages(list(model.parameters()))
    ready = time.perf_counter() - start
    print(json.dumps({"loaded_s": loaded, "ready_s": ready, "auto": pick_io("auto", folder)}))


# -- the parent ------------------------------------------------------------------------------------
def measure(folder: Path, backing: Path, args) -> dict[tuple[str, bool], list[dict]]:  # type: ignore[no-untyped-def,type-arg]
    """Every (io, warm) pair ``--repeats`` times, interleaved."""
    out: dict[tuple[str, bool], list[dict]] = {}  # type: ignore[type-arg]
    for _ in range(args.repeats):
        for warm in (False, True):
            for io in IO_PATHS:
                settle_memory(backing)  # the same state before every run (see bench_load)
                r = run_child(
                    __file__,
                    "measure",
                    folder=folder,
                    backing=backing,
                    io=io,
                    size=args.size,
                    warm=int(warm),
                )
                out.setdefault((io, warm), []).append(r)
                print(f"  {folder} io={io} warm={warm} {r}", file=sys.stderr)
    return out


def table_rows(name: str, runs, skipped: str | None) -> list[str]:  # type: ignore[no-untyped-def]
    if skipped is not None:
        return [f"| {name} | skipped: {skipped} | | | | | |"]

    def med(io: str, warm: bool) -> float:
        return statistics.median(r["ready_s"] for r in runs[(io, warm)])

    auto = runs[("mmap", False)][0]["auto"]
    verdicts = []
    for warm in (False, True):
        best = min(IO_PATHS, key=lambda io: med(io, warm))
        other = next(io for io in IO_PATHS if io != best)
        margin = med(other, warm) / med(best, warm)
        if margin < 1 + TIE:
            verdicts.append(f"tie (within {TIE:.0%})")
        else:
            verdicts.append(f"{'yes' if auto == best else '**no**'} ({best} {margin:.2f}x faster)")
    return [
        f"| {name} | {auto} | {med('mmap', False):.2f} | {med('pread', False):.2f} | "
        f"{med('mmap', True):.2f} | {med('pread', True):.2f} | {verdicts[0]}; warm: {verdicts[1]} |"
    ]


def main() -> None:
    parser = common_parser(__doc__, "io_choice.md")
    parser.set_defaults(size="small")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--mount-dir", type=Path, default=Path("/tmp/bigmodel-bench-mounts"))
    parser.add_argument("--child", choices=["measure"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--backing", type=Path)
    parser.add_argument("--io", choices=IO_PATHS)
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--serve", nargs=3, metavar=("ROOT", "MOUNT", "LATENCY_S"))
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), float(args.serve[2]))
        return
    if args.child:
        measure_child(args.folder, args.backing, args.io, args.size, bool(args.warm))
        return

    folder = ensure_checkpoint(args.cache, args.size)
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = []
    mounts = [("FUSE, C passthrough (bindfs)", "bindfs", 0.0)]
    mounts += [
        (f"FUSE, {ms:g} ms per read request (mfusepy)", "delayed", ms) for ms in args.latency_ms
    ]
    rows += table_rows("local disk", measure(folder, folder, args), None)
    for name, kind, latency in mounts:
        with mounted(kind, folder, args.mount_dir / kind, latency) as skipped:
            runs = None if skipped else measure(args.mount_dir / kind, folder, args)
            rows += table_rows(name, runs, skipped)
    lines = [
        f'# io="auto" against both read paths — {args.size} Llama-style checkpoint, '
        f"{ckpt_bytes / 1e9:.2f} GB fp32",
        "",
        f"Seconds from the call to a ready model (every page of every weight read), medians of "
        f"{args.repeats} runs, each in a fresh process after the same untimed plain read of the "
        "checkpoint. Cold: the page cache emptied right before "
        "the load; warm: the files read once through the same mount first. Command: "
        f"`python benchmarks/bench_io_choice.py --size {args.size} --latency-ms "
        f"{' '.join(f'{ms:g}' for ms in args.latency_ms)}`.",
        "",
        "| filesystem | auto picks | cold mmap s | cold pread s | warm mmap s | warm pread s | auto picked the faster path (cold; warm) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    publish_table(lines, args.out)


if __name__ == "__main__":
    main()
