"""JSON parsing that remembers repeated keys (the standard parser silently keeps the last one)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JsonObject", "duplicates", "loads"]


class JsonObject(dict[str, Any]):
    """A parsed JSON object; ``duplicates`` lists keys that appeared more than once in it."""

    duplicates: list[str]


def _hook(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def loads(text: str) -> Any:
    """``json.loads`` whose objects are :class:`JsonObject`; raises ``ValueError``/``RecursionError``."""
    return json.loads(text, object_pairs_hook=_hook)


def duplicates(value: object) -> list[str]:
    """Repeated keys of ``value`` if it is a parsed JSON object, else nothing."""
    return list(value.duplicates) if isinstance(value, JsonObject) else []
