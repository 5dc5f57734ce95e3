"""``bigmodel verify PATH``: every structural check, plus digests where they were recorded."""

from __future__ import annotations

import argparse
import sys

from bigmodel.checkpoint.open import verify_checkpoint
from bigmodel.cli._common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Subparsers,
    add_command,
    emit_json,
    progress_flag,
)
from bigmodel.foundations.errors import Problem

HELP = "check a checkpoint's structure and, where recorded, the digest of every file"
EXAMPLE = """\
examples:
  bigmodel verify ./my-model          # exit 0: intact; exit 1: problems listed, each naming its file
  bigmodel verify ./my-model --json
"""


def register(sub: Subparsers) -> None:
    p = add_command(sub, "verify", help=HELP, example=EXAMPLE)
    p.add_argument("path", help="checkpoint folder, index file or weights file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _problem(p: Problem) -> dict[str, str | None]:
    return {"file": p.file, "code": p.code, "key": p.key, "message": p.message, "hint": p.hint}


def run(args: argparse.Namespace) -> int:
    result = verify_checkpoint(args.path, progress=progress_flag(args))
    problems, verified, unverified = result.problems, result.verified, result.unverified
    if args.json:
        emit_json(
            {
                "ok": not problems,
                "verified": verified,
                "unverified": unverified,
                "problems": [_problem(p) for p in problems],
            }
        )
        return EXIT_PROBLEM if problems else EXIT_OK
    for name in verified:
        print(f"ok         {name}  (digest matches)")
    for name in unverified:
        print(f"unchecked  {name}  (no digest recorded: structure checked only)")
    if problems:
        print(f"\n{len(problems)} problem(s) found:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(
            f"\nNext: re-download or re-save the files named above; `bigmodel inspect {args.path}` shows what the checkpoint holds.",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    print(
        f"\n{args.path}: intact ({len(verified)} file(s) verified by digest, {len(unverified)} by structure only)"
    )
    return EXIT_OK
