"""Strict JSON for untrusted input: repeated keys are remembered (the standard parser silently
keeps the last one), and the non-standard ``NaN``/``Infinity`` are refused (Python accepts
them, other programs do not, and ``--json`` output must stay valid JSON)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeGuard

__all__ = [
    "JsonObject",
    "TooManyEntriesError",
    "duplicates",
    "is_str_map",
    "loads",
    "loads_object",
]


class JsonObject(dict[str, Any]):
    """A parsed JSON object that repeated keys; ``duplicates`` lists them. Objects without a
    repeated key are plain dicts (a hostile header holds 100,000 of them: no per-object cost)."""

    __slots__ = ("duplicates",)
    duplicates: list[str]


def _hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = JsonObject()
    repeated.duplicates = []
    for key, value in pairs:
        if key in repeated:
            repeated.duplicates.append(key)
        repeated[key] = value
    return repeated


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number (non-finite numbers are not allowed)")


def loads(text: str) -> Any:
    """``json.loads`` for untrusted text: objects with repeated keys are :class:`JsonObject`,
    ``NaN``/``Infinity``/``-Infinity`` raise; errors are ``ValueError``/``RecursionError``."""
    return json.loads(text, object_pairs_hook=_hook, parse_constant=_refuse_constant)


def is_str_map(value: object) -> TypeGuard[dict[str, str]]:
    """A JSON object whose values are all strings (metadata, aliases, digests)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def duplicates(value: object) -> list[str]:
    """Repeated keys of ``value`` if it is a parsed JSON object, else nothing."""
    return list(value.duplicates) if isinstance(value, JsonObject) else []


class TooManyEntriesError(ValueError):
    """The top-level object has more entries than allowed (parsing stopped there)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the object has more than {limit} entries")
        self.limit = limit


_SPACE = re.compile(r"[ \t\n\r]*")
#: The standard library's JSON string scanner (C-accelerated), not in its type stubs.
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _expect(text: str, idx: int, char: str) -> int:
    """Index just past ``char`` (after optional whitespace) at ``idx``, or ValueError."""
    idx = _SPACE.match(text, idx).end()  # type: ignore[union-attr]
    if text[idx : idx + 1] != char:
        raise json.JSONDecodeError(f"Expecting {char!r}", text, idx)
    return idx + 1


def loads_object(text: str, max_entries: int) -> dict[str, Any]:
    """Parse a JSON object entry by entry, as :func:`loads` would, and stop with
    :class:`TooManyEntriesError` as soon as it has more than ``max_entries`` entries, so the memory
    spent on a hostile text is bounded by the entries allowed, not by the text's length."""
    # One decoder call per entry: the standard scanner's key memo lasts one call, so keys
    # repeated in every entry ("dtype", "shape"...) are shared here instead.
    memo: dict[str, str] = {}

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return _hook([(memo.setdefault(key, key), value) for key, value in pairs])

    decoder = json.JSONDecoder(object_pairs_hook=hook, parse_constant=_refuse_constant)
    pairs: list[tuple[str, Any]] = []
    idx = _expect(text, 0, "{")
    idx = _SPACE.match(text, idx).end()  # type: ignore[union-attr]
    closed = text[idx : idx + 1] == "}"
    idx += closed
    while not closed:
        idx = _expect(text, idx, '"')
        key, idx = _scanstring(text, idx, True)
        idx = _SPACE.match(text, _expect(text, idx, ":")).end()  # type: ignore[union-attr]
        value, idx = decoder.raw_decode(text, idx)
        pairs.append((key, value))
        if len(pairs) > max_entries:
            raise TooManyEntriesError(max_entries)
        idx = _SPACE.match(text, idx).end()  # type: ignore[union-attr]
        closed = text[idx : idx + 1] == "}"
        idx = idx + 1 if closed else _expect(text, idx, ",")
    if _SPACE.match(text, idx).end() != len(text):  # type: ignore[union-attr]
        raise json.JSONDecodeError("Extra data", text, idx)
    return _hook(pairs)
