"""``bigmodel convert SRC DST``: ``.bin`` or DCP checkpoints to safetensors, optionally cast."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigmodel.api.dcp import METADATA_NAME, dcp_to_hf
from bigmodel.api.rewrite import rewrite_checkpoint
from bigmodel.cli._common import (
    EXIT_OK,
    Subparsers,
    add_command,
    dtype_arg,
    emit_json,
    progress_flag,
    size_arg,
)
from bigmodel.foundations.units import format_size

HELP = "convert a .bin (single or sharded) or torch.distributed.checkpoint folder to safetensors"
EXAMPLE = """\
examples:
  bigmodel convert ./old-model ./old-model-st                 # pytorch_model*.bin -> model*.safetensors
  bigmodel convert ./old-model ./old-model-bf16 --dtype bf16  # and cast floating-point tensors
  bigmodel convert ./step-1000 ./hf --trusted --prefix model.  # a DCP folder (dcp.save) -> HF layout
Pickles are read only through torch.load(weights_only=True); a file it refuses is reported
with the reason and nothing is written. Tensors a .bin shares between names (tied weights)
are stored once; a DCP folder stores each name separately, and so does its conversion.
A DCP folder's .metadata is a pickle: converting one needs --trusted.
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "convert", help=HELP, example=EXAMPLE)
    p.add_argument("src", help="checkpoint folder, index file or weights file")
    p.add_argument("dst", help="output folder (created if missing)")
    p.add_argument(
        "--dtype", type=dtype_arg, help="cast floating-point tensors: bf16, fp16, fp32, fp64"
    )
    p.add_argument(
        "--max-shard-size",
        type=size_arg,
        default="5GB",
        metavar="SIZE",
        help="largest shard (default 5GB)",
    )
    p.add_argument(
        "--trusted",
        action="store_true",
        help="allow reading a DCP folder's pickled .metadata (only for folders you trust)",
    )
    p.add_argument(
        "--prefix",
        default="",
        help="DCP only: keep the entries under this prefix and strip it (e.g. model.)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _run_dcp(args: argparse.Namespace) -> int:
    saved = dcp_to_hf(
        args.src,
        args.dst,
        trusted=args.trusted,
        prefix=args.prefix,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        progress=progress_flag(args),
    )
    if args.json:
        emit_json(
            {
                "directory": str(saved.directory),
                "source_format": "dcp",
                "files": saved.files,
                "index": saved.index_file,
                "total_size": saved.total_size,
                "aliases": {},
                "copied": [],
            }
        )
        return EXIT_OK
    cast = f", cast to {str(args.dtype).removeprefix('torch.')}" if args.dtype else ""
    print(
        f"converted dcp -> safetensors{cast}: {len(saved.files)} file(s), {format_size(saved.total_size)}, into {saved.directory}"
    )
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if (Path(args.src) / METADATA_NAME).is_file():
        return _run_dcp(args)
    if args.prefix:
        raise ValueError(
            f"--prefix applies to DCP folders only, and {args.src} has no {METADATA_NAME}"
        )
    result = rewrite_checkpoint(
        args.src,
        args.dst,
        max_shard_size=args.max_shard_size,
        safe_serialization=True,
        dtype=args.dtype,
        progress=progress_flag(args),
    )
    saved = result.saved
    if args.json:
        emit_json(
            {
                "directory": str(saved.directory),
                "source_format": result.source_format,
                "files": saved.files,
                "index": saved.index_file,
                "total_size": saved.total_size,
                "aliases": saved.aliases,
                "copied": result.copied_files,
            }
        )
        return EXIT_OK
    cast = f", cast to {str(args.dtype).removeprefix('torch.')}" if args.dtype else ""
    print(
        f"converted {result.source_format} -> safetensors{cast}: {len(saved.files)} file(s), {format_size(saved.total_size)}, into {saved.directory}"
    )
    if saved.aliases:
        print(
            f"tied tensors stored once: {', '.join(f'{a} -> {s}' for a, s in saved.aliases.items())}"
        )
    if result.copied_files:
        print(f"copied {', '.join(result.copied_files)}")
    return EXIT_OK
