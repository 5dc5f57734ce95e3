"""The one shard-writing core of every save: single-process, distributed, DCP conversion.

:class:`WriteOptions` says how every shard of a save is written (format, user metadata,
aliases of tied tensors, durability, digest, cast); :class:`ShardStager` writes one shard
under a temporary name in a :class:`~bigmodel.storage.commit.Commit` (streamed, hashed, cast
on the fly) and, last, the index with every shard's digest. :func:`write_planned` drives a
whole :class:`~bigmodel.checkpoint.sharding.ShardPlan` through the commit protocol in one
process, shards written in parallel; the distributed writer
(:mod:`bigmodel.execution.distributed_save`) stages its shards with the same stager on every
rank and publishes once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bigmodel.checkpoint.index import check_index_fits, file_metadata, index_bytes
from bigmodel.checkpoint.naming import HF_LAYOUT, index_file_name, shard_name
from bigmodel.checkpoint.sharding import (
    ShardPlan,
    TensorSpec,
    plan_safetensors,
    plan_shards,
    stored_sizes,
)
from bigmodel.foundations.errors import CheckpointPermissionError, CheckpointWriteError
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import SaveResult
from bigmodel.storage.commit import Commit
from bigmodel.storage.safetensors import write_safetensors
from bigmodel.storage.torch_bin import write_bin

__all__ = [
    "ShardStager",
    "WriteOptions",
    "plan_files",
    "prepare_directory",
    "write_error",
    "write_planned",
]


@dataclass(frozen=True)
class WriteOptions:
    """How every shard of one save is written."""

    safe: bool = True
    user_meta: Mapping[str, str] = field(default_factory=dict)
    #: alias name -> stored name, for tensors that shared storage and are written once
    aliases: Mapping[str, str] = field(default_factory=dict)
    durable: bool = True
    digest: str | None = None
    #: floating-point tensors are cast to this dtype while they are written
    dtype: torch.dtype | None = None
    progress: bool | None = None

    def file_names(self, plan: ShardPlan) -> tuple[list[str], str | None]:
        """The shard names of ``plan`` and its index name (None for a single file)."""
        count = len(plan.shards)
        names = [shard_name(i, count, safe=self.safe) for i in range(count)]
        return names, index_file_name(count, safe=self.safe)

    def result(self, directory: Path, plan: ShardPlan) -> SaveResult:
        names, index_name = self.file_names(plan)
        return SaveResult(
            directory=directory,
            files=names,
            index_file=index_name,
            total_size=plan.total_size,
            aliases=dict(self.aliases),
        )


def plan_files(
    tensors: Mapping[str, TensorSpec], max_shard_size: int, opts: WriteOptions
) -> ShardPlan:
    """The shards of a save of ``tensors`` ((dtype, shape) of each stored name): safetensors
    files stay inside the reader's limits (entries, header bytes with this save's metadata)."""
    if opts.safe:
        # The largest metadata a file of this save carries: a single file also lists the aliases.
        metadata = file_metadata(opts.user_meta, index_name=None, aliases=opts.aliases, safe=True)
        plan = plan_safetensors(tensors, max_shard_size, cast=opts.dtype, metadata=metadata)
    else:
        plan = plan_shards(stored_sizes(tensors, opts.dtype), max_shard_size)
    names, _ = opts.file_names(plan)
    check_index_fits(names, plan, opts.user_meta, aliases=opts.aliases)
    return plan


def _write_shard(
    fh: BinaryIO,
    *,
    name: str,
    tensors: dict[str, torch.Tensor],
    safe: bool,
    metadata: dict[str, str],
    digest: str | None,
    digests: dict[str, str],
    on_bytes: Callable[[int], object],
    cast: torch.dtype | None,
) -> None:
    if safe:
        _, value = write_safetensors(
            fh, tensors.items(), metadata, on_bytes=on_bytes, digest=digest, cast=cast
        )
    else:
        nbytes, value = write_bin(fh, tensors, digest=digest, cast=cast)
        on_bytes(nbytes)
    if value is not None:
        digests[name] = value


class ShardStager:
    """Stages the files of one save in ``commit``: shards (every one with the same file
    metadata, its digest recorded in :attr:`digests`), then the index."""

    def __init__(self, commit: Commit, opts: WriteOptions, index_name: str | None, bar: Any):
        self.commit = commit
        self.opts = opts
        self.index_name = index_name
        self.bar = bar
        self.file_meta = file_metadata(
            opts.user_meta, index_name=index_name, aliases=opts.aliases, safe=opts.safe
        )
        #: shard name -> digest; threads and ranks add theirs in whatever order they finish
        self.digests: dict[str, str] = {}

    def stage(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard under a temporary name (flushed, fsync'd when durable)."""
        self.commit.stage(
            name,
            functools.partial(
                _write_shard,
                name=name,
                tensors=tensors,
                safe=self.opts.safe,
                metadata=self.file_meta,
                digest=self.opts.digest,
                digests=self.digests,
                on_bytes=self.bar.update,
                cast=self.opts.dtype,
            ),
        )

    def stage_index(self, names: list[str], plan: ShardPlan) -> None:
        """Write the index (nothing for a single file): last, with every shard's digest."""
        if self.index_name is not None:
            data = index_bytes(
                names,
                plan,
                self.opts.user_meta,
                aliases=self.opts.aliases,
                digests=self.digests,
            )
            self.commit.stage_bytes(self.index_name, data)


def prepare_directory(directory: Path, *, create: bool = True) -> None:
    """Refuse a path that is a file; create the folder (with its parents) if ``create``."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"save_directory {directory} is a file; pass a folder (it is created if missing)."
        )
    if not create:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise CheckpointPermissionError(
            f"Cannot create the folder {directory}: {exc.strerror or exc} "
            f"[{CheckpointPermissionError.code}]. Fix: save into a folder this user may write, "
            "or fix the parent folder's permissions."
        ) from exc
    except OSError as exc:
        raise CheckpointWriteError(
            exc.errno,
            f"Cannot create the folder {directory}: {exc.strerror or exc}. Nothing was written. "
            "Fix: save into a writable folder (a read-only filesystem cannot hold a checkpoint).",
        ) from exc


def write_error(
    exc: OSError, directory: Path, step: str, *, committed: bool
) -> CheckpointWriteError:
    """The error a failed save raises, saying which checkpoint the folder holds now."""
    if committed:
        return CheckpointWriteError(
            exc.errno,
            f"The new checkpoint's files are in place in {directory}, but a later step (flushing the "
            f"folder or removing the previous checkpoint's files) failed: {exc.strerror or exc}. Both "
            "versions are complete; until the old files are gone, readers that prefer their layout may "
            "still load them. Fix: save again (it removes leftovers) or delete the stale weight files.",
        )
    return CheckpointWriteError(
        exc.errno,
        f"Saving a checkpoint into {directory} failed while {step}: {exc.strerror or exc}. "
        "The previous checkpoint in the folder is intact and the partial files were removed. "
        "Fix: free disk space or fix permissions, then save again.",
    )


@dataclass
class _Step:
    """What the save is doing, for the error message if it fails."""

    now: str


def _stage_shards(
    stager: ShardStager,
    names: Sequence[str],
    shards: Sequence[list[str]],
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    workers: int,
    step: _Step,
) -> None:
    """Stage every shard, ``workers`` at a time; each is fetched just before it is written."""
    parallel = min(max(1, workers), len(shards))
    if parallel == 1:
        for name, keys in zip(names, shards, strict=True):
            step.now = f"writing {name}"
            stager.stage(name, fetch(keys))
        return
    step.now = "writing the shards"
    # Shards go to separate files: writes (and fsyncs) of several overlap. The GIL is released
    # during each write, the digest update and the cast kernel. A worker's shard is released
    # once written, before it fetches another.
    with ThreadPoolExecutor(parallel, thread_name_prefix="bigmodel-save") as pool:
        jobs = [
            pool.submit(lambda n, k: stager.stage(n, fetch(k)), name, keys)
            for name, keys in zip(names, shards, strict=True)
        ]
        try:
            for job in jobs:
                job.result()
        except BaseException:
            for job in jobs:
                job.cancel()  # shards not started yet are not written at all
            raise


def write_planned(
    directory: Path,
    plan: ShardPlan,
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    opts: WriteOptions,
    *,
    workers: int = 1,
) -> SaveResult:
    """Write the files of ``plan`` into ``directory`` with the commit protocol.

    ``fetch(keys)`` returns one shard's tensors just before the shard is written, so a caller
    whose tensors are not in memory (a DCP checkpoint) holds ``workers`` shards at a time.
    ``workers`` shards are written in parallel.
    """
    names, index_name = opts.file_names(plan)
    prepare_directory(directory)
    commit = Commit(directory, layout=HF_LAYOUT, durable=opts.durable)
    step = _Step("cleaning up after an earlier interrupted save")
    desc = f"Saving {directory.name or directory}"
    with progress_bar(total=plan.total_size, desc=desc, progress=opts.progress) as bar:
        stager = ShardStager(commit, opts, index_name, bar)
        try:
            commit.lock()
            commit.clean_debris()
            _stage_shards(stager, names, plan.shards, fetch, workers, step)
            step.now = f"writing {index_name}"
            stager.stage_index(names, plan)
            step.now = "publishing the new files"
            commit.publish(index_name)
        except OSError as exc:
            commit.abort()
            raise write_error(exc, directory, step.now, committed=commit.committed) from exc
        except BaseException:
            commit.abort()
            raise
        finally:
            commit.unlock()
    logger.info(
        "saved %d tensors (%d bytes) into %d file(s) in %s",
        sum(len(keys) for keys in plan.shards) + len(opts.aliases),
        plan.total_size,
        len(names),
        directory,
    )
    return opts.result(directory, plan)
