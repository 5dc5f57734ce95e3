"""Opening a checkpoint: discovery in a folder, then validation of the index and every header.

:func:`open_checkpoint` accepts a folder, an index file or a single weights file and returns
a read-only :class:`~bigmodel.Checkpoint` (see :mod:`bigmodel.checkpoint.handle`). The index
and every header are untrusted input: the rules live in :mod:`bigmodel.checkpoint.index`, and
every problem found is reported in one :class:`~bigmodel.InvalidCheckpointError`. A save that
replaces the checkpoint while it is being opened makes the open start over.

A URL (``https://...``, ``s3://bucket/prefix``...) is opened by :mod:`bigmodel.checkpoint.remote`
under the same rules; its files are read by range, never downloaded first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bigmodel.checkpoint.handle import Checkpoint, Format
from bigmodel.checkpoint.index import (
    ALIASES_KEY,
    check_recorded_digests,
    file_format,
    open_shards,
    open_weight_file,
    parse_aliases,
    read_index,
)
from bigmodel.checkpoint.naming import discovery_order
from bigmodel.checkpoint.remote import open_remote
from bigmodel.checkpoint.verify import recorded_digests, verify_files
from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    Problem,
    ProblemList,
    UnsafeCheckpointError,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import RemoteOptions, VerifyResult
from bigmodel.storage.atomic import file_identity
from bigmodel.storage.digest import DIGESTS_KEY
from bigmodel.storage.remote import is_remote

__all__ = ["discover", "open_checkpoint", "verify_checkpoint"]


def discover(path: str | os.PathLike[str], *, prefer_safe: bool = True) -> Path:
    """The file that defines the checkpoint at ``path`` (an index or a single weights file).

    In a folder the order is: safetensors index, ``model.safetensors``, ``.bin`` index,
    ``pytorch_model.bin`` (the ``.bin`` pair first when ``prefer_safe=False``).
    """
    p = Path(path)
    if p.is_dir():
        present: list[str] = []
        for attempt in range(_OPEN_ATTEMPTS):
            # One listing, not a stat per candidate: a save that replaces a single file with a
            # sharded checkpoint (or the reverse) between two stats would hide both layouts.
            names = set(os.listdir(p))
            for name in discovery_order(prefer_safe):
                if name in names and (p / name).is_file():
                    return p / name
            present = sorted(n for n in names if n.endswith((".safetensors", ".bin", ".json")))
            if not any(n.endswith((".safetensors", ".bin")) for n in present):
                break  # no weight files at all (say, only config.json): no save is in flight
            time.sleep(0.01 * (attempt + 1))  # weight files but no entry point: a save in flight?
        raise CheckpointNotFoundError(
            f"No checkpoint in folder {p}: looked for {', '.join(discovery_order(prefer_safe))}"
            + (
                f"; found only {', '.join(present[:10])}"
                if present
                else "; the folder has no weight files"
            )
            + ". Fix: pass the folder a checkpoint was saved into, or the path of a weights or index file."
        )
    if not p.exists():
        raise CheckpointNotFoundError(
            f"No checkpoint at {p}: the path does not exist. Fix: check the path."
        )
    return p


#: Problems a concurrent save can cause while a reader opens the folder; opening is retried.
_TRANSIENT = frozenset({"missing-shard", "shard-not-from-this-index", "file-changed"})


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return file_identity(path.stat())
    except FileNotFoundError:
        return None


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    prefer_safe: bool = True,
    verify: bool = False,
    remote: RemoteOptions | None = None,
) -> Checkpoint:
    """Open and validate the checkpoint at ``path`` (folder, index file or weights file).

    Every structural rule is checked (see :class:`~bigmodel.InvalidCheckpointError`). If a save
    into the folder replaces the checkpoint while it is being opened, the open starts over, so
    the result is one complete version. With ``verify=True`` every file that has a recorded
    digest is also re-hashed (:meth:`Checkpoint.verify`) and a mismatch raises.

    ``path`` may be a URL (``https://host/model``, ``s3://bucket/model``, or such a URL's
    index or ``.safetensors`` file; needs ``pip install 'bigmodel[remote]'``): the same rules
    apply, only headers are fetched, and ``remote`` (:class:`~bigmodel.RemoteOptions`)
    sets retries, timeouts and concurrency.
    """
    if is_remote(path):
        ckpt = open_remote(str(path), prefer_safe=prefer_safe, options=remote)
        return _verified(ckpt) if verify else ckpt
    for attempt in range(_OPEN_ATTEMPTS):
        target = discover(path, prefer_safe=prefer_safe)
        before = _identity(target)
        try:
            ckpt = _open_target(target)
        except (InvalidCheckpointError, FileNotFoundError) as exc:
            changed = (
                _identity(target) != before or discover(path, prefer_safe=prefer_safe) != target
            )
            transient = isinstance(exc, FileNotFoundError) or any(
                p.code in _TRANSIENT for p in exc.problems
            )
            if changed and transient and attempt + 1 < _OPEN_ATTEMPTS:
                logger.info(
                    "%s changed while it was being opened (a concurrent save?); opening it again",
                    target,
                )
                time.sleep(0.01 * (attempt + 1))
                continue
            raise
        return _verified(ckpt) if verify else ckpt
    raise AssertionError("unreachable")  # pragma: no cover


def _verified(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` once every file with a recorded digest matches it; else the problems raise."""
    result = ckpt.verify()
    if result.problems:
        ckpt.close()
        _raise_problems(result.problems)
    return ckpt


_OPEN_ATTEMPTS = 5


def _open_target(target: Path) -> Checkpoint:
    name = target.name
    if name.endswith(".index.json"):
        return _open_sharded(target)
    fmt = file_format(name)
    if fmt is None:
        raise InvalidCheckpointError.one(
            str(target),
            "unknown-format",
            "not a recognised checkpoint file; expected *.safetensors, *.bin, *.pt, *.pth or *.index.json.",
            hint="pass the folder or the index file of the checkpoint.",
        )
    return _open_single(target, fmt)


def _open_single(target: Path, fmt: Format) -> Checkpoint:
    problems = ProblemList()
    reader = open_weight_file(target, fmt)
    metadata: dict[str, Any] = dict(reader.metadata)
    weight_map = dict.fromkeys(reader.names(), target.name)
    aliases = parse_aliases(str(target), metadata.get(ALIASES_KEY), weight_map, problems)
    _raise_problems(problems)
    return Checkpoint(
        path=target,
        format=fmt,
        index_file=None,
        weight_map=weight_map,
        metadata=metadata,
        aliases=aliases,
        readers={target.name: reader},
    )


def _raise_problems(problems: list[Problem]) -> None:
    """Raise one error for every problem; an unsafe pickle anywhere keeps its specific type."""
    if problems:
        unsafe = any(p.code == "unsafe-pickle" for p in problems)
        raise (UnsafeCheckpointError if unsafe else InvalidCheckpointError)(problems)


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    prefer_safe: bool = True,
    max_workers: int | None = None,
    progress: bool | None = None,
    remote: RemoteOptions | None = None,
) -> VerifyResult:
    """Every problem of the checkpoint at ``path``, reported at once: the structural ones
    :func:`open_checkpoint` finds, and the digest check of every file (:meth:`Checkpoint.verify`)
    -- even when other files are broken, each file that can be read is still hashed, so a
    truncated shard does not hide a corrupt one. (A URL whose checkpoint does not open reports
    the structural problems only.)"""
    try:
        ckpt = open_checkpoint(path, prefer_safe=prefer_safe, remote=remote)
    except InvalidCheckpointError as exc:
        if is_remote(path):
            return VerifyResult(verified=[], unverified=[], problems=list(exc.problems))
        return _verify_what_opens(path, prefer_safe, list(exc.problems), max_workers, progress)
    with ckpt:
        return ckpt.verify(max_workers=max_workers, progress=progress)


def _verify_what_opens(
    path: str | os.PathLike[str],
    prefer_safe: bool,
    problems: list[Problem],
    max_workers: int | None,
    progress: bool | None,
) -> VerifyResult:
    """The structural ``problems`` of a checkpoint that does not open, plus the digest check of
    each of its shards that opens on its own."""
    target = discover(path, prefer_safe=prefer_safe)
    if not target.name.endswith(".index.json"):  # a single file: nothing else to hash
        return VerifyResult(verified=[], unverified=[], problems=problems)
    fmt: Format = "bin" if target.name.endswith(".bin.index.json") else "safetensors"
    try:
        weight_map, metadata, _ = read_index(target)
    except InvalidCheckpointError:  # the index itself is unreadable: no shard list to hash
        return VerifyResult(verified=[], unverified=[], problems=problems)
    readers = open_shards(target, weight_map, fmt, [])
    try:
        result = verify_files(
            target.parent,
            readers,
            recorded_digests(metadata, readers),
            max_workers=max_workers,
            progress=progress,
        )
    finally:
        for reader in readers.values():
            reader.close()
    seen = {(p.file, p.code, p.key) for p in problems}
    extra = [p for p in result.problems if (p.file, p.code, p.key) not in seen]
    return VerifyResult(
        verified=result.verified, unverified=result.unverified, problems=problems + extra
    )


def _open_sharded(index: Path) -> Checkpoint:
    fmt: Format = "bin" if index.name.endswith(".bin.index.json") else "safetensors"
    weight_map, metadata, problems = read_index(index)
    readers = open_shards(index, weight_map, fmt, problems)
    problems.extend(check_recorded_digests(str(index), metadata.get(DIGESTS_KEY), readers))
    aliases = parse_aliases(str(index), metadata.get(ALIASES_KEY), weight_map, problems)
    _raise_problems(problems)
    # Files in name order: shard order for Hugging Face names.
    ordered = {shard: readers[shard] for shard in sorted(set(weight_map.values()))}
    return Checkpoint(
        path=index,
        format=fmt,
        index_file=index,
        weight_map=weight_map,
        metadata=metadata,
        aliases=aliases,
        readers=ordered,
    )
