"""Opening a checkpoint under a URL (``https://host/models/llama``, ``s3://bucket/llama``).

The same checkpoint, the same rules as in a folder: discovery tries the entry points of
:func:`~bigmodel.checkpoint.naming.discovery_order` in order (a ``HEAD`` each: a URL prefix
has no listing one can rely on); the index is untrusted input, bounded in size and checked by
:mod:`bigmodel.checkpoint.index`'s rules; a shard name must be a plain file name
(:func:`~bigmodel.checkpoint.index.unsafe_shard_name`), so it can never leave the prefix; every
header is parsed by the local parser; the index is cross-checked against the headers. All
problems are reported together in one :class:`~bigmodel.InvalidCheckpointError`.

Shards' sizes and headers are fetched concurrently (a 100-shard checkpoint is two round trips
deep, not two hundred). ``.bin`` files are refused: torch's zip format needs the whole file.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.index import (
    ALIASES_KEY,
    INDEX_FIX,
    MAX_INDEX_SIZE,
    Reader,
    _cross_check,
    _is_flat_index,
    _layout,
    _repeated_key_problems,
    _shard_names,
    check_recorded_digests,
    file_format,
    parse_aliases,
    unsafe_shard_name,
)
from bigmodel.checkpoint.naming import discovery_order
from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    Problem,
    ProblemList,
)
from bigmodel.storage.digest import DIGESTS_KEY
from bigmodel.storage.remote import RemoteFolder, RemoteOptions, redact, split_url
from bigmodel.storage.remote_safetensors import RemoteSafetensorsFile

__all__ = ["open_remote", "remote_problems"]

#: Requests in flight while shards are discovered and their headers read.
_OPEN_THREADS = 16


def open_remote(
    url: str, *, prefer_safe: bool = True, options: RemoteOptions | None = None
) -> Checkpoint:
    """Open and validate the checkpoint at ``url`` (a folder URL, or an index or weights file's)."""
    folder, name, size = _discover(url, prefer_safe, options)
    problems = ProblemList()
    if name.endswith(".index.json"):
        weight_map, metadata = _read_remote_index(folder, name, size, problems)
        readers = _open_shards(folder, name, weight_map, problems)
        index_file: Any = folder.path(name)
        problems.extend(check_recorded_digests(str(index_file), metadata.get(DIGESTS_KEY), readers))
    else:
        _refuse_bin(folder, name)
        readers = {name: RemoteSafetensorsFile(folder, name, size)}
        metadata = dict(readers[name].metadata)
        weight_map = dict.fromkeys(readers[name].names(), name)
        index_file = None
    aliases = parse_aliases(str(folder.path(name)), metadata.get(ALIASES_KEY), weight_map, problems)
    remote_problems(problems)
    return Checkpoint(
        path=folder.path(name),
        format="safetensors",
        index_file=index_file,
        weight_map=weight_map,
        metadata=metadata,
        aliases=aliases,
        readers={shard: readers[shard] for shard in sorted(readers)},
        remote=folder,
    )


def remote_problems(problems: list[Problem]) -> None:
    """Raise one error for every problem found."""
    if problems:
        raise InvalidCheckpointError(problems)


def _discover(
    url: str, prefer_safe: bool, options: RemoteOptions | None
) -> tuple[RemoteFolder, str, int]:
    """The folder, the entry point's name and its size."""
    base, last = split_url(url)
    if last.endswith(".index.json") or file_format(last) is not None:
        folder = RemoteFolder(base, options)
        size = folder.size(last)
        if size is None:
            raise CheckpointNotFoundError(
                f"No checkpoint at {redact(url)}: the server has no such file. Fix: check the URL."
            )
        return folder, last, size
    folder = RemoteFolder(url, options)
    for name in discovery_order(prefer_safe):
        size = folder.size(name)
        if size is not None:
            return folder, name, size
    raise CheckpointNotFoundError(
        f"No checkpoint at {redact(url)}: looked for {', '.join(discovery_order(prefer_safe))}. "
        "Fix: pass the URL of the folder a checkpoint was saved into, or of its index or weights file."
    )


def _refuse_bin(folder: RemoteFolder, name: str) -> None:
    if file_format(name) != "safetensors":
        raise InvalidCheckpointError.one(
            str(folder.path(name)),
            "remote-bin-unsupported",
            "a .bin checkpoint cannot be read from a URL: torch's zip format needs the whole file.",
            hint="convert it to safetensors (bigmodel convert), or download it and load the folder.",
        )


def _read_remote_index(
    folder: RemoteFolder, name: str, size: int, problems: list[Problem]
) -> tuple[dict[str, str], dict[str, Any]]:
    """The weight map and metadata of the remote index, by the rules of a local one."""
    file = str(folder.path(name))
    _refuse_bin(folder, name.removesuffix(".index.json"))
    if size > MAX_INDEX_SIZE:
        raise InvalidCheckpointError.one(
            file,
            "index-too-large",
            f"the index is {size} bytes, above the {MAX_INDEX_SIZE}-byte limit.",
            hint=INDEX_FIX,
        )
    raw = bytes(folder.read(name, 0, size))
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
    raw_map, metadata, fields = _layout(file, obj)
    problems.extend(_repeated_key_problems(file, raw_map, fields))
    return _shard_names(file, raw_map, problems), metadata


def _shard_problem(file: str, shard: str, key: str) -> Problem | None:
    """Why the index may not name ``shard``: the local rules of a shard name, and safetensors."""
    reason = unsafe_shard_name(shard)
    if reason is None and file_format(shard) != "safetensors":
        reason = "is not a safetensors file, but the index is a safetensors index"
    if reason is None:
        return None
    return Problem(
        file, "unsafe-shard-name", f"shard name {shard!r} {reason}.", key=key, hint=INDEX_FIX
    )


def _open_shards(
    folder: RemoteFolder, index: str, weight_map: Mapping[str, str], problems: list[Problem]
) -> dict[str, Reader]:
    """Open every shard the index names (concurrently), then check the index against them."""
    file = str(folder.path(index))
    usable: list[str] = []
    bad: set[str] = set()
    for key, shard in weight_map.items():
        if shard in usable or shard in bad:
            continue
        problem = _shard_problem(file, shard, key)
        if problem is None:
            usable.append(shard)
        else:
            problems.append(problem)
            bad.add(shard)

    def open_one(shard: str) -> RemoteSafetensorsFile | Problem | InvalidCheckpointError:
        size = folder.size(shard)
        if size is None:
            key = next(k for k, s in weight_map.items() if s == shard)
            return Problem(
                file,
                "missing-shard",
                f"the index names shard {shard!r}, which is not under {redact(folder.url)}.",
                key=key,
                hint="upload the missing shard or re-save the checkpoint.",
            )
        try:
            return RemoteSafetensorsFile(folder, shard, size)
        except InvalidCheckpointError as exc:
            return exc

    readers: dict[str, Reader] = {}
    with ThreadPoolExecutor(max_workers=_OPEN_THREADS) as pool:
        for shard, got in zip(usable, pool.map(open_one, usable), strict=True):
            if isinstance(got, Problem):
                problems.append(got)
            elif isinstance(got, InvalidCheckpointError):
                problems.extend(got.problems)
            else:
                readers[shard] = got
    # _cross_check reads only str(), .name and .parent / shard of the index's location.
    _cross_check(cast(Path, folder.path(index)), weight_map, readers, problems)
    return readers
