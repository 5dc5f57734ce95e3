"""``bigmodel estimate PATH``: memory needed per device, and whether it fits a budget."""

from __future__ import annotations

import argparse
import re

import psutil
import torch

from bigmodel.api.estimate import Estimate, estimate_memory
from bigmodel.cli._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Subparsers,
    add_command,
    dtype_arg,
    emit_json,
    print_table,
)
from bigmodel.foundations.units import format_size

HELP = "estimate the memory a checkpoint needs per device, and whether it fits"
EXAMPLE = """\
examples:
  bigmodel estimate ./llama                               # budget: available RAM, then disk
  bigmodel estimate ./llama --max-memory 0=20GB,cpu=8GB --dtype bf16
  bigmodel estimate ./llama --max-memory cpu=8GB,disk --json
  bigmodel estimate s3://bucket/llama                      # reads the index and headers only
Planned as load_checkpoint(device_map="auto") plans the model, from the tensor names
alone: devices are filled in order (accelerators, cpu, disk); a name prefix that
does not fit is split into its parts, except repeated blocks (the numbered children of a
prefix, model.layers.7), which are placed whole; tied tensors are counted once. "blocks" are
the units never split. Only disk may be given without a size; a budget without disk
offloads the rest to disk, as load_checkpoint and accelerate do (disk=0 forbids it). When
an accelerator runs blocks kept on cpu or disk, "reserved" is the room kept free on it
for them (the largest streamed block and one more read ahead). Exit code 1 when the
checkpoint does not fit.
Leave room for activations: the budget is for weights only.
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "estimate", help=HELP, example=EXAMPLE)
    p.add_argument(
        "path", help="checkpoint folder, index file or weights file, or its URL (https://, s3://)"
    )
    p.add_argument(
        "--max-memory",
        metavar="BUDGET",
        help="e.g. 0=20GB,cpu=8GB,disk (default: available RAM, then disk)",
    )
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        help="size floating-point tensors at this dtype: bf16, fp16, fp32, fp64",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    budget = args.max_memory or {"cpu": psutil.virtual_memory().available, "disk": None}
    plan = estimate_memory(args.path, max_memory=budget, dtype=args.dtype)
    dtype = (
        str(args.dtype).removeprefix("torch.")
        if isinstance(args.dtype, torch.dtype)
        else "as stored"
    )
    if args.json:
        _emit(plan, dtype)
        return EXIT_OK if plan.fits else EXIT_PROBLEM
    _print_table(plan, dtype)
    if plan.fits:
        print("fits: yes")
        return EXIT_OK
    names = [b.name for b in plan.unplaced]
    left = format_size(sum(b.nbytes for b in plan.unplaced))
    print(
        f"fits: no — {len(names)} block(s), {left}, left over: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
    )
    print(
        "Next: raise --max-memory, allow disk to offload the rest (disk with no size), "
        "or use a smaller --dtype."
    )
    return EXIT_PROBLEM


def _emit(plan: Estimate, dtype: str) -> None:
    emit_json(
        {
            "fits": plan.fits,
            "total_bytes": plan.total,
            "dtype": dtype,
            "largest_block": {"name": plan.largest.name, "bytes": plan.largest.nbytes},
            "devices": [
                {
                    "device": d.device,
                    "budget": d.budget,
                    "used": d.used,
                    "reserved": d.reserved,
                    "blocks": d.blocks,
                }
                for d in plan.devices
            ],
            "implicit_disk": plan.implicit_disk,
            "unplaced": [{"name": b.name, "bytes": b.nbytes} for b in plan.unplaced],
        }
    )


def _print_table(plan: Estimate, dtype: str) -> None:
    print(
        f"Weights {format_size(plan.total)} ({dtype}); largest block {plan.largest.name} {format_size(plan.largest.nbytes)}"
    )
    print()
    rows = [
        [
            d.device,
            "unlimited" if d.budget is None else format_size(d.budget),
            format_size(d.used),
            format_size(d.reserved) if d.reserved else "",
            len(d.blocks),
            _compact(d.blocks),
        ]
        for d in plan.devices
    ]
    print_table(["device", "budget", "needed", "reserved", "blocks", "which"], rows)
    print()
    if plan.implicit_disk:
        print("disk: not in --max-memory; what fits nowhere else goes there (disk=0 forbids it)")


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def _compact(names: list[str], limit: int = 6) -> str:
    """Block names for one table cell: numbered runs as ``model.layers.0..11``, others by name,
    in order; past ``limit`` entries, how many more (a device's blocks need not be contiguous:
    the planner fills a budget with later blocks that fit)."""
    runs: list[tuple[str, int, int] | str] = []
    for name in names:
        match = _NUMBERED.match(name)
        last = runs[-1] if runs else None
        if (
            match
            and isinstance(last, tuple)
            and last[0] == match[1]
            and last[2] + 1 == int(match[2])
        ):
            runs[-1] = (last[0], last[1], int(match[2]))
        elif match:
            runs.append((match[1], int(match[2]), int(match[2])))
        else:
            runs.append(name)
    shown = [
        r if isinstance(r, str) else f"{r[0]}{r[1]}" if r[1] == r[2] else f"{r[0]}{r[1]}..{r[2]}"
        for r in runs
    ]
    more = f", ... (+{len(shown) - limit})" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more
