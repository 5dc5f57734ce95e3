"""Shared pieces of the subcommands: exit codes, tables, JSON, argument types.

Imports no torch (``inspect`` and ``verify`` must start fast): :func:`dtype_arg` imports it
when a command takes a dtype.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bigmodel.foundations.units import parse_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "add_command",
    "dtype_arg",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "emit_json",
    "error_document",
    "printable",
    "print_table",
    "progress_flag",
    "size_arg",
    "TerminalSafe",
]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, file: Any = None) -> None:
    """A plain aligned text table (numbers right-aligned)."""
    out = file or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()

    print(fmt(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print(fmt(row), file=out)


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].rstrip("x%")
    try:
        float(head)
    except ValueError:
        return False
    return True


if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction


def add_command(
    sub: Subparsers, name: str, *, help: str, example: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with real examples, shown verbatim."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help + ".",
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def size_arg(text: str) -> int:
    """argparse type for sizes (shard sizes, model sizes): a positive number of bytes, with
    parse_size's explanation on error. Zero is refused: no shard or model can be that small."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(
            f"Invalid size {text!r}: the size must be above 0 bytes, e.g. '5GB' or '500MB'."
        )
    return size


def dtype_arg(text: str) -> torch.dtype | None:
    """argparse type for dtypes (bf16, fp16, fp32, ...; auto: as stored), with parse_dtype's
    list on error."""
    from bigmodel.foundations.dtypes import parse_dtype

    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Control characters a terminal needs to lay out text; every other one is shown escaped.
_LAYOUT = frozenset("\n\r\t")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences), lone surrogates and other
    unprintable characters shown as Python escapes (``\\x1b``, ``\\ud800``); layout characters
    (newline, carriage return, tab) are kept."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() or ch in _LAYOUT else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


class TerminalSafe(io.TextIOBase):
    """A text stream that writes :func:`printable` text to ``stream``: names and metadata come
    from untrusted files, and must not retitle, clear or otherwise drive the terminal."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def fileno(self) -> int:
        return int(self._stream.fileno())


def error_document(exc: BaseException) -> dict[str, Any]:
    """What ``--json`` prints when a command fails: one JSON document, like every other run."""
    problems = [
        {"file": p.file, "code": p.code, "key": p.key, "message": p.message, "hint": p.hint}
        for p in getattr(exc, "problems", ())
    ]
    return {
        "ok": False,
        "error": {
            "type": type(exc).__name__,
            "code": getattr(exc, "code", None),
            "message": str(exc),
            "problems": problems,
        },
    }


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def progress_flag(args: argparse.Namespace) -> bool | None:
    """``--quiet`` forces bars off; otherwise bigmodel's default (a terminal, no env var)."""
    return False if getattr(args, "quiet", False) else None
