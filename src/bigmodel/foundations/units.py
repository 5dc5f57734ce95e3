"""The one size parser, shared by shard sizes and memory budgets."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["SIZE_UNITS", "format_size", "parse_size"]

#: Accepted units (case-insensitive). Decimal units are powers of 1000, binary units of 1024.
#: A bare number (int or digit string) is a count of bytes. Unlike accelerate, a lowercase
#: ``"5gb"`` means gigabytes, never gigabits.
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED = "a non-negative number of bytes, or a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '10GB' or '1.5GiB'"


def parse_size(value: int | str) -> int:
    """Return ``value`` as a whole number of bytes.

    ``int`` values are bytes and pass through. Strings are a number (``"1.5"``, ``"200"``)
    followed by an optional unit from :data:`SIZE_UNITS`, case-insensitive, with spaces
    allowed around and between them: ``"1.5GB"`` is 1_500_000_000, ``" 200 MB "`` is
    200_000_000, ``"5GiB"`` is 5 * 2**30, ``"100"`` is 100 bytes. A fractional number of bytes
    is rounded down. Anything else (negative sizes, unknown units, booleans) raises
    ``ValueError`` naming the value and the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"Invalid size {value!r}: a boolean is not a size; expected {_ACCEPTED}.")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(
                f"Invalid size {value!r}: sizes cannot be negative; expected {_ACCEPTED}."
            )
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"Invalid size {value!r} of type {type(value).__name__}: expected {_ACCEPTED}."
        )
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"Invalid size {value!r}: expected {_ACCEPTED}.")
    unit = match.group("unit").lower() or "b"
    if unit not in SIZE_UNITS:
        raise ValueError(
            f"Invalid size {value!r}: unknown unit {match.group('unit')!r}; expected {_ACCEPTED}."
        )
    try:
        number = Decimal(match.group("number"))
    except InvalidOperation as exc:  # pragma: no cover - the regex only admits valid decimals
        raise ValueError(f"Invalid size {value!r}: expected {_ACCEPTED}.") from exc
    return int(number * SIZE_UNITS[unit])


def format_size(num_bytes: int) -> str:
    """Human-readable decimal size for messages and tables (``1.50 GB``)."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover
