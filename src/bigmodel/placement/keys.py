"""Matching checkpoint keys to module keys: explicit regex mappings and whole-model prefixes.

Only two kinds of renaming ever happen, and both are reported: the caller's ``key_mapping``
(regex -> replacement, the first pattern that matches a key wins) and adding or removing one
whole-model prefix (a checkpoint saved from ``Wrapper.model`` loaded into the inner model, or
the reverse). Arbitrary substrings are never renamed silently.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from bigmodel.foundations.errors import KeyMappingError

__all__ = ["KeyPlan", "key_plan", "match_keys"]


@dataclass(frozen=True)
class KeyPlan:
    """Checkpoint key -> module key, plus what was changed and why."""

    to_model: dict[str, str]
    #: Only the keys whose name changed.
    renamed: dict[str, str]
    #: ``"removed 'model.'"`` / ``"added 'model.'"`` when a whole-model prefix was detected.
    prefix: str | None


def _first(key: str) -> str | None:
    head, dot, _ = key.partition(".")
    return head if dot else None


def _detect_prefix(ckpt_keys: list[str], model_keys: Collection[str]) -> tuple[str, str] | None:
    """The ("remove"|"add", prefix) that matches clearly more keys than leaving names alone.

    A prefix only counts as whole-model when at least half of the keys on its side carry it.
    """
    best: tuple[str, str] | None = None
    best_score = sum(k in model_keys for k in ckpt_keys)
    if best_score == len(model_keys):
        return None
    for prefix in sorted({p for k in ckpt_keys if (p := _first(k))}):
        dotted = prefix + "."
        if sum(k.startswith(dotted) for k in ckpt_keys) * 2 < len(ckpt_keys):
            continue
        score = sum(
            (k[len(dotted) :] if k.startswith(dotted) and k not in model_keys else k) in model_keys
            for k in ckpt_keys
        )
        if score > best_score:
            best, best_score = ("remove", prefix), score
    for prefix in sorted({p for k in model_keys if (p := _first(k))}):
        dotted = prefix + "."
        if sum(k.startswith(dotted) for k in model_keys) * 2 < len(model_keys):
            continue
        score = sum((k if k in model_keys else dotted + k) in model_keys for k in ckpt_keys)
        if score > best_score:
            best, best_score = ("add", prefix), score
    return best


def match_keys(
    ckpt_keys: Iterable[str],
    model_keys: Collection[str],
    *,
    key_mapping: Mapping[str, str] | None = None,
    detect_prefix: bool = True,
) -> KeyPlan:
    """Rename checkpoint keys with ``key_mapping`` then, if it helps, a whole-model prefix."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in (key_mapping or {}).items()]
    mapped: dict[str, str] = {}
    for key in ckpt_keys:
        new = key
        for pattern, repl in compiled:
            new, count = pattern.subn(repl, key)
            if count:
                break
        mapped[key] = new

    prefix_note = None
    if detect_prefix:
        found = _detect_prefix(list(mapped.values()), model_keys)
        if found is not None:
            action, prefix = found
            dotted = prefix + "."
            for key, new in mapped.items():
                if new in model_keys:
                    continue
                if action == "remove" and new.startswith(dotted):
                    mapped[key] = new[len(dotted) :]
                elif action == "add":
                    mapped[key] = dotted + new
            prefix_note = f"{'removed' if action == 'remove' else 'added'} {dotted!r}"

    return key_plan(mapped, prefix_note)


def key_plan(mapped: dict[str, str], prefix: str | None = None) -> KeyPlan:
    """The plan of ``mapped`` (checkpoint key -> module key); two keys sent to one module key
    raise :class:`~bigmodel.KeyMappingError`."""
    seen: dict[str, str] = {}
    for key, new in mapped.items():
        if new in seen:
            raise KeyMappingError(
                f"Checkpoint keys {seen[new]!r} and {key!r} both map to the module key {new!r} "
                f"[{KeyMappingError.code}]. Fix: make key_mapping send them to different names."
            )
        seen[new] = key
    renamed = {k: v for k, v in mapped.items() if k != v}
    return KeyPlan(to_model=mapped, renamed=renamed, prefix=prefix)
