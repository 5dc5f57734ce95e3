"""Opening a checkpoint under a URL (``https://host/models/llama``, ``s3://bucket/llama``).

The same checkpoint, the same rules as in a folder: discovery tries the entry points of
:func:`~bigmodel.checkpoint.naming.discovery_order` in order (a ``HEAD`` each: a URL prefix
has no listing one can rely on); the index is untrusted input, bounded in size and checked by
:mod:`bigmodel.checkpoint.index`'s rules; a shard name must be a plain file name
(:func:`~bigmodel.checkpoint.index.shard_name_problem`), so it can never leave the prefix; every
header is parsed by the local parser; the index is cross-checked against the headers. All
problems are reported together in one :class:`~bigmodel.InvalidCheckpointError`.

Shards' sizes and headers are fetched concurrently (a 100-shard checkpoint is two round trips
deep, not two hundred). ``.bin`` files are refused: torch's zip format needs the whole file.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.index import (
    ALIASES_KEY,
    Reader,
    check_index_size,
    check_recorded_digests,
    cross_check,
    file_format,
    parse_aliases,
    parse_index,
    shard_name_problem,
    usable_shards,
)
from bigmodel.checkpoint.naming import discovery_order
from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    Problem,
    ProblemList,
)
from bigmodel.foundations.types import RemoteOptions
from bigmodel.storage.digest import DIGESTS_KEY
from bigmodel.storage.remote import RemoteFolder, redact, split_url
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
        recorded = metadata.get(DIGESTS_KEY)
        digests = recorded if strict_json.is_str_map(recorded) else {}
        readers = _open_shards(folder, name, weight_map, digests, problems)
        index_file: Any = folder.path(name)
        problems.extend(check_recorded_digests(str(index_file), metadata.get(DIGESTS_KEY), readers))
    else:
        _refuse_bin(folder, name)
        readers = {name: _open_file(folder, name, size, None)}
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
    """The weight map and metadata of the remote index, by the rules of a local one
    (:func:`~bigmodel.checkpoint.index.parse_index`), its size bounded before it is fetched."""
    file = str(folder.path(name))
    _refuse_bin(folder, name.removesuffix(".index.json"))
    check_index_size(file, size)
    weight_map, metadata, found = parse_index(file, bytes(folder.read(name, 0, size)))
    problems.extend(found)
    return weight_map, metadata


def _open_file(folder: RemoteFolder, name: str, size: int, digest: str | None) -> Reader:
    """The file ``name``: from the local cache when it holds it whole and valid (see
    :mod:`bigmodel.storage.remote_cache`), else read by range from the server."""
    if folder.cache is not None:
        cached = folder.cache.lookup(name, size, digest)
        if cached is not None:
            return cached
    return RemoteSafetensorsFile(folder, name, size, digest)


def _open_shards(
    folder: RemoteFolder,
    index: str,
    weight_map: Mapping[str, str],
    digests: Mapping[str, str],
    problems: list[Problem],
) -> dict[str, Reader]:
    """Open every shard the index names (concurrently), then check the index against them."""
    file = str(folder.path(index))

    def name_problem(shard: str, key: str) -> Problem | None:
        return shard_name_problem(file, shard, key, "safetensors")

    usable = usable_shards(weight_map, name_problem, problems)

    def open_one(shard: str) -> Reader | Problem | InvalidCheckpointError:
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
            return _open_file(folder, shard, size, digests.get(shard))
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
    cross_check(folder.path(index), weight_map, readers, problems)
    return readers
