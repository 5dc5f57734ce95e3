"""``bigmodel estimate PATH``: memory needed per device, and whether it fits a budget."""

from __future__ import annotations

import argparse

import psutil
import torch

from bigmodel.api.estimate import estimate_memory
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
Planned as load_checkpoint(device_map="auto") plans the model, from the tensor names
alone: devices are filled in order (accelerators, cpu, disk); a name prefix that
does not fit is split into its parts, except repeated blocks (the numbered children of a
prefix, model.layers.7), which are placed whole; tied tensors are counted once. "blocks" are
the units never split. Only disk may be given without a size. Exit code 1 when the
checkpoint does not fit.
Leave room for activations: the budget is for weights only.
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "estimate", help=HELP, example=EXAMPLE)
    p.add_argument("path", help="checkpoint folder, index file or weights file")
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
        emit_json(
            {
                "fits": plan.fits,
                "total_bytes": plan.total,
                "dtype": dtype,
                "largest_block": {"name": plan.largest.name, "bytes": plan.largest.nbytes},
                "devices": [
                    {"device": d.device, "budget": d.budget, "used": d.used, "blocks": d.blocks}
                    for d in plan.devices
                ],
                "unplaced": [{"name": b.name, "bytes": b.nbytes} for b in plan.unplaced],
            }
        )
        return EXIT_OK if plan.fits else EXIT_PROBLEM
    print(
        f"Weights {format_size(plan.total)} ({dtype}); largest block {plan.largest.name} {format_size(plan.largest.nbytes)}"
    )
    print()
    rows = []
    for d in plan.devices:
        span = (
            ""
            if not d.blocks
            else d.blocks[0]
            if len(d.blocks) == 1
            else f"{d.blocks[0]} .. {d.blocks[-1]}"
        )
        rows.append(
            [
                d.device,
                "unlimited" if d.budget is None else format_size(d.budget),
                format_size(d.used),
                len(d.blocks),
                span,
            ]
        )
    print_table(["device", "budget", "needed", "blocks", "which"], rows)
    print()
    if plan.fits:
        print("fits: yes")
        return EXIT_OK
    names = [b.name for b in plan.unplaced]
    left = format_size(sum(b.nbytes for b in plan.unplaced))
    print(
        f"fits: no — {len(names)} block(s), {left}, left over: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
    )
    print("Next: raise --max-memory, add 'disk' to offload the rest, or use a smaller --dtype.")
    return EXIT_PROBLEM
