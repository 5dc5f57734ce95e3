"""What an index file is, and the rules it must follow: it is untrusted input.

An index (``model.safetensors.index.json``) is ``{"metadata": {...}, "weight_map": {tensor:
shard file}}``, or the flat ``{tensor: shard file}`` that accelerate's
``load_checkpoint_in_model`` also reads (no metadata). Shard names must be plain file names
inside the checkpoint folder; keys must appear once; ``metadata`` may carry bigmodel's aliases
of tied tensors and shard digests. Every function here returns or collects
:class:`~bigmodel.Problem` records so that a checkpoint's problems are reported together.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import (
    InvalidCheckpointError,
    Problem,
    ProblemList,
    UnsupportedTensorError,
)
from bigmodel.foundations.log import logger
from bigmodel.storage.digest import DIGEST_KEY, DIGESTS_KEY
from bigmodel.storage.files import file_kind, read_bounded
from bigmodel.storage.safetensors import SafetensorsFile

if TYPE_CHECKING:  # both import torch: a safetensors checkpoint is opened without it
    from bigmodel.checkpoint.sharding import ShardPlan
    from bigmodel.storage.torch_bin import BinFile

__all__ = [
    "check_index_fits",
    "file_format",
    "open_shards",
    "open_weight_file",
    "ALIASES_KEY",
    "INDEX_FIX",
    "MAX_INDEX_SIZE",
    "Reader",
    "IndexLocation",
    "check_index_size",
    "check_recorded_digests",
    "cross_check",
    "parse_index",
    "shard_name_problem",
    "usable_shards",
    "parse_aliases",
    "read_index",
    "unsafe_shard_name",
]

Reader: TypeAlias = "SafetensorsFile | BinFile"

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
    if not strict_json.is_str_map(raw):
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
    """The weight map, the metadata and the problems of the index file ``index``.

    A file that is not an index at all raises; problems in its entries are collected. A flat
    index has no metadata (``{}`` is returned).
    """
    raw = read_bounded(
        index, MAX_INDEX_SIZE, code="index-too-large", what="the index", hint=INDEX_FIX
    )
    return parse_index(str(index), raw)


def parse_index(file: str, raw: bytes) -> tuple[dict[str, str], dict[str, Any], list[Problem]]:
    """The weight map, the metadata and the problems of an index whose bytes are ``raw`` (read
    bounded by :data:`MAX_INDEX_SIZE`); ``file`` names it in errors (a path or a URL). The one
    set of index rules, for a local index (:func:`read_index`) and a remote one: bytes that
    are not an index at all raise; problems in its entries are collected."""
    raw_map, metadata, fields = _layout(file, _decode_index(file, raw))
    problems = _repeated_key_problems(file, raw_map, fields)
    weight_map = _shard_names(file, raw_map, problems)
    return weight_map, metadata, problems


def check_index_size(file: str, size: int) -> None:
    """Refuse an index above :data:`MAX_INDEX_SIZE` before it is read (a remote index's size
    comes from the server; a local one is read by ``read_bounded`` under the same limit)."""
    if size > MAX_INDEX_SIZE:
        raise InvalidCheckpointError.one(
            file,
            "index-too-large",
            f"the index is {size} bytes, above the {MAX_INDEX_SIZE}-byte limit.",
            hint=INDEX_FIX,
        )


def _is_flat_index(obj: object) -> bool:
    """A flat index, as accelerate's ``load_checkpoint_in_model`` reads one: a non-empty JSON
    object of ``{tensor name: shard file}`` strings, with neither ``weight_map`` nor
    ``metadata``. (accelerate takes any object without ``weight_map`` as flat; an object that
    is not all strings, or an empty one, is refused here rather than loading nothing.)"""
    return (
        strict_json.is_str_map(obj)
        and bool(obj)
        and "weight_map" not in obj
        and "metadata" not in obj
    )


def _decode_index(file: str, raw: bytes) -> dict[str, Any]:
    """The parsed index, refused if not JSON, or neither layout of an index."""
    try:
        obj = strict_json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidCheckpointError.one(
            file, "index-not-json", f"the index is not valid UTF-8 JSON ({exc}).", hint=INDEX_FIX
        ) from None
    if not isinstance(obj, dict) or not (
        isinstance(obj.get("weight_map"), dict) or _is_flat_index(obj)
    ):
        raise InvalidCheckpointError.one(
            file,
            "index-no-weight-map",
            'the index must be a JSON object with a "weight_map" object, or a flat JSON object '
            "mapping each tensor name to its shard file.",
            hint=INDEX_FIX,
        )
    return obj


def _layout(
    file: str, obj: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, object]]]:
    """The raw weight map, the metadata, and the wrapping objects whose repeated fields are
    problems (none for a flat index: its repeated fields are repeated keys)."""
    if _is_flat_index(obj):
        return obj, {}, []
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError.one(
            file, "index-bad-metadata", '"metadata" must be a JSON object.', hint=INDEX_FIX
        )
    return obj["weight_map"], metadata, [("the index", obj), ('"metadata"', metadata)]


def _repeated_key_problems(
    file: str, raw_map: dict[str, Any], fields: list[tuple[str, object]]
) -> list[Problem]:
    """Keys the weight map lists twice, then fields the index or its metadata repeat."""
    problems = ProblemList(
        Problem(
            file,
            "duplicate-key",
            "the index lists this key more than once.",
            key=k,
            hint=INDEX_FIX,
        )
        for k in strict_json.duplicates(raw_map)
    )
    for field_name, value in fields:
        if strict_json.duplicates(value):
            problems.append(
                Problem(
                    file,
                    "index-bad-json",
                    f"{field_name} repeats the field(s) {strict_json.duplicates(value)}.",
                    hint=INDEX_FIX,
                )
            )
    return problems


def _shard_names(file: str, raw_map: dict[str, Any], problems: list[Problem]) -> dict[str, str]:
    """The weight map's entries whose value is a string; each other value adds a problem."""
    weight_map: dict[str, str] = {}
    for key, shard in raw_map.items():
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
    return weight_map


def check_recorded_digests(
    file: str, recorded: object, readers: Mapping[str, Reader]
) -> list[Problem]:
    """Cheap consistency: a shard whose embedded digest differs from the index's record is
    not the shard this index was written with (a concurrent save replaced it, or a file was
    copied in from another checkpoint). No data is hashed here."""
    if recorded is None:
        return []
    if not strict_json.is_str_map(recorded):
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


#: Metadata keys bigmodel writes itself; user metadata must not use them.
RESERVED_METADATA = frozenset({"format", "total_size", ALIASES_KEY, DIGEST_KEY, DIGESTS_KEY})


def index_bytes(
    names: list[str],
    plan: ShardPlan,
    user_meta: Mapping[str, str],
    *,
    aliases: Mapping[str, str],
    digests: Mapping[str, str],
) -> bytes:
    """The index file of a sharded save: metadata (sizes, aliases, digests) and weight map."""
    index_meta: dict[str, object] = {"total_size": plan.total_size, **user_meta}
    if aliases:
        index_meta[ALIASES_KEY] = dict(aliases)
    if digests:  # in file order, whichever thread or rank finished first
        index_meta[DIGESTS_KEY] = dict(sorted(digests.items()))
    weight_map = {k: name for name, keys in zip(names, plan.shards, strict=True) for k in keys}
    index = {"metadata": index_meta, "weight_map": weight_map}
    return json.dumps(index, indent=2).encode("utf-8") + b"\n"


def check_index_fits(
    names: list[str], plan: ShardPlan, user_meta: Mapping[str, str], *, aliases: Mapping[str, str]
) -> None:
    """Refuse, before anything is written, a save whose index the reader would refuse
    (above :data:`MAX_INDEX_SIZE`). Measured on the real encoding, with the longest digests."""
    if len(names) < 2:
        return
    digests = dict.fromkeys(names, "sha256:" + "0" * 64)
    size = len(index_bytes(names, plan, user_meta, aliases=aliases, digests=digests))
    if size > MAX_INDEX_SIZE:
        raise UnsupportedTensorError(
            f"The index of this checkpoint would take {size} bytes, above the {MAX_INDEX_SIZE} bytes "
            "a reader accepts (tensor names and metadata are too long, or there are too many "
            "tensors). Fix: shorten the tensor names or the metadata."
        )


def file_metadata(
    user_meta: Mapping[str, str], *, index_name: str | None, aliases: Mapping[str, str], safe: bool
) -> dict[str, str]:
    """The ``__metadata__`` of every shard (a single file also records the aliases)."""
    file_meta = {"format": "pt", **user_meta}
    if index_name is None and aliases:
        file_meta[ALIASES_KEY] = json.dumps(dict(aliases), sort_keys=True)
    if not safe and index_name is None and user_meta:
        logger.warning(
            "metadata is not stored in a single pytorch_model.bin (the format has no place for it); use safe_serialization=True to keep it"
        )
    return file_meta


def file_format(name: str) -> Literal["safetensors", "bin"] | None:
    """The weight format a file name announces (None for anything else)."""
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".bin", ".pt", ".pth")):
        return "bin"
    return None


def open_weight_file(path: Path, fmt: Literal["safetensors", "bin"]) -> Reader:
    """Open and validate one weights file (header only; ``.bin``: torch's zip, weights_only)."""
    if fmt == "safetensors":
        return SafetensorsFile(path)
    from bigmodel.storage.torch_bin import BinFile

    return BinFile(path)


def shard_name_problem(file: str, shard: str, key: str, fmt: str) -> Problem | None:
    """Why the index ``file`` may not name ``shard`` for ``key``: not a plain file name inside
    the checkpoint's folder or prefix (:func:`unsafe_shard_name`), or not of the index's
    format. The rule for a local index and a remote one; None when the name is acceptable."""
    reason = unsafe_shard_name(shard)
    if reason is None and file_format(shard) != fmt:
        reason = f"is not a {fmt} file, but the index is a {fmt} index"
    if reason is None:
        return None
    return Problem(
        file, "unsafe-shard-name", f"shard name {shard!r} {reason}.", key=key, hint=INDEX_FIX
    )


def _shard_problem(file: str, shard: str, key: str, fmt: str, directory: Path) -> Problem | None:
    """Why the shard an index names cannot be opened: an unsafe name, another format, absent."""
    problem = shard_name_problem(file, shard, key, fmt)
    if problem is not None:
        return problem
    try:
        mode = (directory / shard).stat().st_mode
    except FileNotFoundError:
        return Problem(
            file,
            "missing-shard",
            f"the index names shard {shard!r}, which is not in {directory}.",
            key=key,
            hint="copy the missing shard into the folder or re-save the checkpoint.",
        )
    if not stat.S_ISREG(mode):
        return Problem(
            file,
            "not-a-regular-file",
            f"the index names shard {shard!r}, which is {file_kind(mode)}, not a regular file.",
            key=key,
            hint="replace it with the real shard file, or re-save the checkpoint.",
        )
    return None


def usable_shards(
    weight_map: Mapping[str, str],
    problem: Callable[[str, str], Problem | None],
    problems: list[Problem],
) -> list[str]:
    """The distinct shard names of ``weight_map``, in order, for which ``problem(shard, key)``
    (asked once per shard, with the first key naming it) finds nothing; each problem found is
    added to ``problems``."""
    shards: list[str] = []
    bad: set[str] = set()
    for key, shard in weight_map.items():
        if shard in shards or shard in bad:
            continue
        found = problem(shard, key)
        if found is None:
            shards.append(shard)
        else:
            problems.append(found)
            bad.add(shard)
    return shards


class IndexLocation(Protocol):
    """Where an index is, as :func:`cross_check` uses it: a local :class:`~pathlib.Path`, or a
    remote path (:class:`~bigmodel.storage.remote.RemotePath`). ``str()`` shows it, ``name`` is
    its file name, and ``parent / shard`` is where a shard beside it is."""

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> IndexLocation: ...

    def __truediv__(self, name: str) -> IndexLocation: ...


def cross_check(
    index: IndexLocation,
    weight_map: Mapping[str, str],
    readers: Mapping[str, Reader],
    problems: list[Problem],
) -> None:
    """Every tensor a shard holds is listed once, under that shard; every listed key is there."""
    holder: dict[str, str] = {}
    for shard, reader in readers.items():
        for name in reader.names():
            if name in holder:
                problems.append(
                    Problem(
                        str(index),
                        "duplicate-key",
                        f"the tensor is stored in both {holder[name]!r} and {shard!r}; which copy wins is undefined.",
                        key=name,
                        hint=INDEX_FIX,
                    )
                )
                continue
            holder[name] = shard
            if weight_map.get(name) != shard:
                where = (
                    f"is not listed in the index {index.name}"
                    if name not in weight_map
                    else f"is listed in the index {index.name} under {weight_map[name]!r}"
                )
                problems.append(
                    Problem(
                        str(index.parent / shard),
                        "shard-key-not-in-index",
                        f"the shard holds this tensor, which {where}.",
                        key=name,
                        hint=INDEX_FIX,
                    )
                )
    for key, shard in weight_map.items():
        if shard in readers and holder.get(key) != shard:
            problems.append(
                Problem(
                    str(index),
                    "index-key-not-in-shard",
                    f"the index maps this key to {shard!r}, whose header does not contain it.",
                    key=key,
                    hint=INDEX_FIX,
                )
            )


def open_shards(
    index: Path,
    weight_map: Mapping[str, str],
    fmt: Literal["safetensors", "bin"],
    problems: list[Problem],
) -> dict[str, Reader]:
    """Open every shard the index names and check the index against their headers.

    The rules: shard names are plain relative names of the index's format inside its folder;
    every named shard exists and is valid; each tensor is stored once, in the shard the index
    names for it; every key the index lists is in that shard. Each broken rule adds a
    :class:`~bigmodel.Problem`; the shards that could be opened are returned.
    """
    file, folder = str(index), index.parent
    readers: dict[str, Reader] = {}

    def problem(shard: str, key: str) -> Problem | None:
        return _shard_problem(file, shard, key, fmt, folder)

    for shard in usable_shards(weight_map, problem, problems):
        try:
            readers[shard] = open_weight_file(index.parent / shard, fmt)
        except InvalidCheckpointError as exc:
            problems.extend(exc.problems)
            if isinstance(problems, ProblemList):
                problems.dropped += exc.total - len(exc.problems)
    cross_check(index, weight_map, readers, problems)
    return readers
