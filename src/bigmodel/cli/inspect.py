"""``bigmodel inspect PATH``: what is inside a checkpoint, read from headers only.

A safetensors checkpoint is described without importing torch (dtypes are header names).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.cli._common import EXIT_OK, Subparsers, add_command, emit_json, print_table
from bigmodel.foundations.units import format_size

HELP = "show format, layout, shards, dtypes, sizes and metadata of a checkpoint"
EXAMPLE = """\
examples:
  bigmodel inspect ./my-model                     # a folder (sharded or single file)
  bigmodel inspect ./my-model/model.safetensors.index.json --tensors
  bigmodel inspect pytorch_model.bin --json       # machine-readable
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "inspect", help=HELP, example=EXAMPLE)
    p.add_argument("path", help="checkpoint folder, index file or weights file (.safetensors/.bin)")
    p.add_argument(
        "--tensors",
        action="store_true",
        help="also list every tensor: name, dtype, shape, size, file",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class _Tensor:
    """What inspect shows of a stored tensor (torch-free, unlike :class:`~bigmodel.TensorInfo`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensors(ckpt: Checkpoint) -> list[_Tensor]:
    by_file = ckpt.keys_by_file()
    file_of = {name: file for file, names in by_file.items() for name in names}
    return [
        _Tensor(k, ckpt.dtype_name(k), ckpt.shape(k), ckpt.nbytes(k), file_of[k])
        for k in ckpt.stored_keys()
    ]


def describe(ckpt: Checkpoint, *, tensors: bool) -> dict[str, Any]:
    """Everything ``inspect`` reports, as plain data."""
    infos = _tensors(ckpt)
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_file: dict[str, list[int]] = {f: [0, 0] for f in ckpt.files}
    for info in infos:
        by_dtype[info.dtype][0] += 1
        by_dtype[info.dtype][1] += info.nbytes
        per_file[info.file][0] += 1
        per_file[info.file][1] += info.nbytes
    largest = max(infos, key=lambda i: i.nbytes, default=None)
    out: dict[str, Any] = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "layout": "sharded" if ckpt.is_sharded else "single file",
        "tensors": len(infos),
        "aliases": dict(ckpt.aliases),
        "parameters": sum(i.numel for i in infos),
        "total_bytes": sum(i.nbytes for i in infos),
        "files": [
            {
                "name": f,
                "bytes": ckpt.file_sizes()[f],
                "tensors": n,
                "tensor_bytes": b,
            }
            for f, (n, b) in per_file.items()
        ],
        "dtypes": {d: {"tensors": n, "bytes": b} for d, (n, b) in sorted(by_dtype.items())},
        "largest": None
        if largest is None
        else {
            "name": largest.name,
            "dtype": largest.dtype,
            "shape": list(largest.shape),
            "bytes": largest.nbytes,
        },
        "metadata": ckpt.metadata,
    }
    if tensors:
        out["tensor_list"] = [
            {
                "name": i.name,
                "dtype": i.dtype,
                "shape": list(i.shape),
                "bytes": i.nbytes,
                "file": i.file,
            }
            for i in infos
        ]
    return out


def _count(n: int) -> str:
    if n < 1000:
        return str(n)
    exponent = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000**exponent:.2f}{' KMBT'[exponent]}"


def run(args: argparse.Namespace) -> int:
    with open_checkpoint(args.path) as ckpt:
        data = describe(ckpt, tensors=args.tensors)
    if args.json:
        emit_json(data)
        return EXIT_OK
    print(f"Checkpoint  {data['path']}")
    print(
        f"Format      {data['format']}, {data['layout']} ({len(data['files'])} file{'s' if len(data['files']) != 1 else ''})"
    )
    print(
        f"Tensors     {data['tensors']} stored"
        + (f", {len(data['aliases'])} tied alias(es)" if data["aliases"] else "")
    )
    print(f"Parameters  {_count(data['parameters'])} ({data['parameters']:,})")
    print(f"Data        {format_size(data['total_bytes'])}")
    if data["largest"]:
        big = data["largest"]
        print(
            f"Largest     {big['name']} {big['dtype']} {big['shape']} {format_size(big['bytes'])}"
        )
    print()
    print_table(
        ["dtype", "tensors", "size"],
        [[d, v["tensors"], format_size(v["bytes"])] for d, v in data["dtypes"].items()],
    )
    print()
    print_table(
        ["file", "tensors", "size"],
        [[f["name"], f["tensors"], format_size(f["bytes"])] for f in data["files"]],
    )
    meta = {
        k: v
        for k, v in data["metadata"].items()
        if k not in ("bigmodel_digests", "bigmodel_aliases")
    }
    if meta:
        print()
        print("Metadata")
        for key, value in meta.items():
            print(textwrap.shorten(f"  {key}: {value}", width=120, placeholder=" ..."))
    if args.tensors:
        print()
        print_table(
            ["name", "dtype", "shape", "size", "file"],
            [
                [t["name"], t["dtype"], t["shape"], format_size(t["bytes"]), t["file"]]
                for t in data["tensor_list"]
            ],
        )
    return EXIT_OK
