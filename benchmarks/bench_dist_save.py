"""Training stall of a two-rank FSDP2 save: background (side group) vs synchronous collective.

    python benchmarks/bench_dist_save.py                  # "small" Llama-style model, 2 ranks
    python benchmarks/bench_dist_save.py --size medium    # ~0.9 GB fp32
    python benchmarks/bench_dist_save.py --size tiny      # smoke run

Two gloo ranks on this machine (subprocesses) FSDP2-shard the same Llama-style model and save
it ``--saves`` times with each method, taking an optimizer-like step (every weight changed
in place) and a few all-reduces on the default group between saves:

* ``sync``: ``save_checkpoint(model, folder)``; the loop is blocked until the save is durable.
* ``background``: ``save_checkpoint(model, folder, background=True)``; the loop is blocked
  while each rank stages its own shards; the gathers, writes and commit run on a worker
  thread over the side gloo group.

Reported (medians over the saves, the slower rank): the stall (the call's duration), split
into planning (``planned_locally``: pieces and plan, reused while the model is unchanged) and
staging (the copy into staging memory), the write (call to durable), and the staging buffer's
size against the bytes of the rank's own pieces.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": (64, 2, 128, 256),
    "small": (512, 8, 1408, 8000),
    "medium": (1024, 12, 2816, 32000),
}


def _timed(module: object, name: str, into: list[float]) -> None:
    """Record the duration of every call of ``module.name`` (the background save's parts)."""
    import functools
    import time

    real = getattr(module, name)

    @functools.wraps(real)
    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(module, name, timed)


def _rank(rank: int, port: int, size: str, saves: int, root: Path) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist
    from bench_train_save import llama
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import bigmodel
    from bigmodel.execution import background, distributed_save

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=600),
    )
    model = llama(*SIZES[size])
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out: dict[str, list[float]] = {"sync stall": [], "background stall": [], "background write": []}
    out["background plan"], out["background stage"] = [], []
    _timed(distributed_save, "planned_locally", out["background plan"])
    _timed(distributed_save, "submit", out["background stage"])
    for method in ("sync", "background"):
        for i in range(saves):
            folder = root / method / f"step-{i}"
            dist.barrier()
            call = time.monotonic()
            handle = bigmodel.save_checkpoint(
                model, folder, progress=False, background=method == "background"
            )
            out[f"{method} stall"].append(time.monotonic() - call)
            with torch.no_grad():  # the optimizer's step: every weight changes in place
                for p in model.parameters():
                    p.to_local().mul_(0.999)
            total = torch.ones(1)
            for _ in range(10):
                dist.all_reduce(total)
            if method == "background":
                handle.wait()
                out["background write"].append(float(handle.finished_at) - call)
    local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.state_dict().values()
    )
    out["staging bytes"] = [float(background.staging_peak_bytes())]
    out["local bytes"] = [float(local)]
    dist.barrier()
    dist.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="a markdown file for the table")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        result = _rank(args.rank, args.port, args.size, args.saves, args.root)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # gloo's threads can abort interpreter finalisation
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-dist-save-") as tmp:
        base = [sys.executable, __file__, "--size", args.size, "--saves", str(args.saves)]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
        procs = [
            subprocess.Popen(
                [*base, "--rank", str(r), "--port", str(port), "--root", tmp],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(2)
        ]
        outputs = [p.communicate(timeout=1800)[0] for p in procs]
    results = [
        json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:])
        for o in outputs
    ]
    med = {k: max(statistics.median(r[k]) for r in results) for k in results[0]}
    lines = [
        f"Two gloo ranks, FSDP2 Llama-style `{args.size}` {SIZES[args.size]}, fp32, "
        f"{args.saves} saves per method (medians, slower rank).",
        "",
        "| method | stall per save (s) | of which planning / staging (s) "
        "| write, call to durable (s) |",
        "|---|---|---|---|",
        f"| bigmodel sync (collective) | {med['sync stall']:.3f} | - | {med['sync stall']:.3f} |",
        f"| bigmodel background (side group) | {med['background stall']:.3f} | "
        f"{med['background plan']:.4f} / {med['background stage']:.4f} | "
        f"{med['background write']:.3f} |",
        "",
        f"background stall / sync stall: {med['background stall'] / med['sync stall']:.3f}; "
        f"background write / sync: {med['background write'] / med['sync stall']:.2f}; "
        f"staging buffer per rank: {med['staging bytes'] / 2**20:.1f} MiB for "
        f"{med['local bytes'] / 2**20:.1f} MiB of the rank's own pieces",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        command = f"python benchmarks/bench_dist_save.py --size {args.size} --saves {args.saves}"
        args.out.write_text(
            f"# Two-rank background saves\n\n`{command}` (2 shared CPU cores)\n\n{text}"
        )


if __name__ == "__main__":
    main()
