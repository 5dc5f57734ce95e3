"""``bigmodel reshard SRC DST --max-shard-size SIZE``: rewrite a checkpoint with another shard size."""

from __future__ import annotations

import argparse

from bigmodel.api.rewrite import rewrite_checkpoint
from bigmodel.cli._common import (
    EXIT_OK,
    Subparsers,
    add_command,
    emit_json,
    progress_flag,
    size_arg,
)
from bigmodel.foundations.units import format_size

HELP = "rewrite a checkpoint with a new shard size (streaming, memory bounded by one tensor)"
EXAMPLE = """\
examples:
  bigmodel reshard ./llama ./llama-2gb --max-shard-size 2GB
  bigmodel reshard ./llama ./llama --max-shard-size 5GB     # in place: the save is atomic
Sizes: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB. The format is kept (use
'bigmodel convert' for .bin -> safetensors), and so is the checkpoint's string metadata.
The other files of the source folder (config, tokenizer, README) are copied along; files
the destination already has are kept, and subfolders are not copied (a warning names both).
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "reshard", help=HELP, example=EXAMPLE)
    p.add_argument("src", help="checkpoint folder, index file or weights file")
    p.add_argument("dst", help="output folder (created if missing; may be the source folder)")
    p.add_argument(
        "--max-shard-size",
        required=True,
        type=size_arg,
        metavar="SIZE",
        help="largest shard, e.g. 5GB",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = rewrite_checkpoint(
        args.src, args.dst, max_shard_size=args.max_shard_size, progress=progress_flag(args)
    )
    saved = result.saved
    if args.json:
        emit_json(
            {
                "directory": str(saved.directory),
                "files": saved.files,
                "index": saved.index_file,
                "total_size": saved.total_size,
                "copied": result.copied_files,
            }
        )
        return EXIT_OK
    print(
        f"wrote {len(saved.files)} file(s), {format_size(saved.total_size)} of tensors, into {saved.directory}"
    )
    for name in saved.files + ([saved.index_file] if saved.index_file else []):
        print(f"  {name}")
    if result.copied_files:
        print(f"copied {', '.join(result.copied_files)}")
    return EXIT_OK
