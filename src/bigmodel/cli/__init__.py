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
from bigmodel.cli._common import EXIT_PROBLEM, EXIT_USAGE
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
    try:
        return int(args.run(args))
    except BigModelError as exc:
        print(f"bigmodel {args.command}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"bigmodel {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bigmodel {args.command}: interrupted", file=sys.stderr)
        return 130
