"""The ``bigmodel`` command line: one module per subcommand.

Exit codes: 0 success, 1 a problem was found (invalid or corrupt checkpoint, a model that
does not fit), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bigmodel.cli import convert, demo, estimate, inspect, reshard, verify
from bigmodel.cli._common import EXIT_PROBLEM, EXIT_USAGE, TerminalSafe, emit_json, error_document
from bigmodel.foundations.errors import BigModelError

__all__ = ["main"]

_COMMANDS = (demo, inspect, verify, reshard, convert, estimate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel",
        description="Save, inspect, check and load very large PyTorch checkpoints (Hugging Face layout).",
        epilog="Run 'bigmodel COMMAND --help' for the options and an example of each command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what bigmodel does (to stderr)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("bigmodel").addHandler(handler)
        logging.getLogger("bigmodel").setLevel(logging.INFO)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalSafe(stdout), TerminalSafe(stderr)
    try:
        return _run(args)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand: 1 for a problem with a file or a model, 2 for a usage error; with
    ``--json``, a failure prints one JSON document too."""
    try:
        return int(args.run(args))
    except BigModelError as exc:
        return _fail(args, exc, EXIT_PROBLEM)
    except (FileNotFoundError, NotADirectoryError) as exc:  # a path that is not a checkpoint
        return _fail(args, exc, EXIT_PROBLEM)
    except ValueError as exc:  # an option the command cannot use
        return _fail(args, exc, EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"bigmodel {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    if getattr(args, "json", False):
        emit_json(error_document(exc))
    print(f"bigmodel {args.command}: {exc}", file=sys.stderr)
    return code
