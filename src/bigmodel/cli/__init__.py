"""The ``bigmodel`` command line: one module per subcommand.

Exit codes: 0 success, 1 a problem was found (invalid or corrupt checkpoint, a model that
does not fit), 2 usage error, 141 the reader of the output went away (``| head``).

Only the subcommand that runs is imported (all of them for ``bigmodel --help`` or an unknown
command), and ``inspect`` and ``verify`` never import torch: they answer in a fraction of the
second ``import torch`` takes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TextIO

from bigmodel.cli._common import EXIT_PROBLEM, EXIT_USAGE, TerminalSafe, emit_json, error_document
from bigmodel.foundations.errors import BigModelError

__all__ = ["main"]

#: Subcommands in the order ``--help`` lists them; each is the module ``bigmodel.cli.NAME``.
_COMMANDS = ("demo", "inspect", "verify", "reshard", "convert", "estimate")
#: The exit status of a process killed by SIGPIPE, as shells report it.
EXIT_BROKEN_PIPE = 141


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"bigmodel.cli.{name}")


def _chosen_command(argv: Sequence[str] | None) -> str | None:
    """The subcommand ``argv`` names (the first argument that is not an option: the top-level
    options take no value), or None when it names none or an unknown one."""
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
    return None


def version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bigmodel")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        from bigmodel import __version__

        return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with every subcommand, or only ``command`` (the only module imported)."""
    parser = argparse.ArgumentParser(
        prog="bigmodel",
        description="Save, inspect, check and load very large PyTorch checkpoints (Hugging Face layout).",
        epilog="Run 'bigmodel COMMAND --help' for the options and an example of each command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what bigmodel does (to stderr)"
    )
    parser.add_argument("--version", action="version", version=f"bigmodel {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        if command is None or name == command:
            _command_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_chosen_command(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help and --version
        return _quiet_exit(int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("bigmodel").addHandler(handler)
        logging.getLogger("bigmodel").setLevel(logging.INFO)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalSafe(stdout), TerminalSafe(stderr)
    try:
        code = _run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _broken_pipe(stdout)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _quiet_exit(code: int) -> int:
    """``code``, once what argparse printed (help, version) reached its reader; a reader that
    went away is not an error to report."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _broken_pipe(sys.stdout)
    return code


def _broken_pipe(stdout: TextIO) -> int:
    """The reader of stdout went away (``bigmodel inspect ... | head``): stop quietly, as the
    Python documentation recommends (signal.SIGPIPE notes): point stdout at devnull so that
    the interpreter's final flush does not fail again, and exit like a process killed by
    SIGPIPE would."""
    try:
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured output)
        return EXIT_BROKEN_PIPE
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return EXIT_BROKEN_PIPE


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
