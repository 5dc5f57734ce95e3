"""What an index file is, and the rules it must follow: it is untrusted input.

An index (``model.safetensors.index.json``) is ``{"metadata": {...}, "weight_map": {tensor:
shard file}}``. Shard names must be plain file names inside the checkpoint folder; keys must
appear once; ``metadata`` may carry bigmodel's aliases of tied tensors and shard digests. Every
function here returns or collects :class:`~bigmodel.Problem` records so that a checkpoint's
problems are reported together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import InvalidCheckpointError, Problem
from bigmodel.storage.digest import DIGEST_KEY, DIGESTS_KEY
from bigmodel.storage.safetensors import SafetensorsFile
from bigmodel.storage.torch_bin import BinFile

__all__ = [
    "ALIASES_KEY",
    "INDEX_FIX",
    "MAX_INDEX_SIZE",
    "Reader",
    "check_recorded_digests",
    "parse_aliases",
    "read_index",
    "unsafe_shard_name",
]

Reader = SafetensorsFile | BinFile

#: Key (in index ``metadata``, or in a single file's ``__metadata__`` as a JSON string) of the
#: map {alias name: stored name} for tensors that shared storage and were written once.
ALIASES_KEY = "bigmodel_aliases"
#: Index files above this size are refused before parsing.
MAX_INDEX_SIZE = 256 * 1000 * 1000
INDEX_FIX = "re-save the checkpoint, or repair the index so that it lists each tensor once with the shard that holds it."


def parse_aliases(
    file: str, raw: object, stored: Mapping[str, str], problems: list[Problem]
) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        problems.append(
            Problem(
                file,
                "bad-alias",
                f"metadata[{ALIASES_KEY!r}] must map alias names to stored tensor names.",
                hint=INDEX_FIX,
            )
        )
        return {}
    aliases: dict[str, str] = {}
    for alias, source in raw.items():
        if alias in stored:
            problems.append(
                Problem(
                    file,
                    "bad-alias",
                    "an alias must not also be stored; readers would disagree on its value.",
                    key=alias,
                    hint=INDEX_FIX,
                )
            )
        elif source not in stored:
            problems.append(
                Problem(
                    file,
                    "bad-alias",
                    f"an alias of {source!r}, which the checkpoint does not store.",
                    key=alias,
                    hint=INDEX_FIX,
                )
            )
        else:
            aliases[alias] = source
    return aliases


def unsafe_shard_name(name: str) -> str | None:
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if "/" in name or "\\" in name:
        return "contains a path separator; shards must be plain file names inside the checkpoint folder"
    if name in {".", ".."}:
        return "is not a file name"
    if os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    return None


def read_index(index: Path) -> tuple[dict[str, str], dict[str, Any], list[Problem]]:
    file = str(index)
    size = index.stat().st_size
    if size > MAX_INDEX_SIZE:
        raise InvalidCheckpointError.one(
            file,
            "index-too-large",
            f"the index is {size} bytes, above the {MAX_INDEX_SIZE}-byte limit.",
            hint=INDEX_FIX,
        )
    try:
        obj = strict_json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidCheckpointError.one(
            file, "index-not-json", f"the index is not valid UTF-8 JSON ({exc}).", hint=INDEX_FIX
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise InvalidCheckpointError.one(
            file,
            "index-no-weight-map",
            'the index must be a JSON object with a "weight_map" object.',
            hint=INDEX_FIX,
        )
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError.one(
            file, "index-bad-metadata", '"metadata" must be a JSON object.', hint=INDEX_FIX
        )
    problems = [
        Problem(
            file,
            "duplicate-key",
            "the index lists this key more than once.",
            key=k,
            hint=INDEX_FIX,
        )
        for k in strict_json.duplicates(obj["weight_map"])
    ]
    for field_name, value in (("the index", obj), ('"metadata"', metadata)):
        if strict_json.duplicates(value):
            problems.append(
                Problem(
                    file,
                    "index-bad-json",
                    f"{field_name} repeats the field(s) {strict_json.duplicates(value)}.",
                    hint=INDEX_FIX,
                )
            )
    weight_map: dict[str, str] = {}
    for key, shard in obj["weight_map"].items():
        if not isinstance(shard, str):
            problems.append(
                Problem(
                    file,
                    "index-bad-value",
                    f"the weight_map value must be a shard file name, not {type(shard).__name__}.",
                    key=key,
                    hint=INDEX_FIX,
                )
            )
        else:
            weight_map[key] = shard
    return weight_map, metadata, problems


def check_recorded_digests(
    file: str, recorded: object, readers: Mapping[str, Reader]
) -> list[Problem]:
    """Cheap consistency: a shard whose embedded digest differs from the index's record is
    not the shard this index was written with (a concurrent save replaced it, or a file was
    copied in from another checkpoint). No data is hashed here."""
    if recorded is None:
        return []
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        return [
            Problem(
                file,
                "bad-digests",
                f"metadata[{DIGESTS_KEY!r}] must map shard names to digest strings.",
                hint=INDEX_FIX,
            )
        ]
    problems = []
    for shard, reader in readers.items():
        embedded = reader.metadata.get(DIGEST_KEY)
        if isinstance(embedded, str) and shard in recorded and recorded[shard] != embedded:
            problems.append(
                Problem(
                    str(reader.path),
                    "shard-not-from-this-index",
                    f"the shard's embedded digest {embedded} differs from the {recorded[shard]} recorded by the index: "
                    "the shard was replaced after the index was written.",
                    hint="if a save into this folder is running, open the checkpoint again when it finishes; otherwise re-save the checkpoint.",
                )
            )
    return problems
