"""The one shard-writing core of every save: single-process, distributed, DCP conversion.

:func:`stage_shard` writes one shard under a temporary name in a
:class:`~bigmodel.storage.commit.Commit` (streamed, hashed, cast on the fly);
:func:`write_planned` drives a whole :class:`~bigmodel.checkpoint.sharding.ShardPlan` through
the commit protocol in one process, with shards written in parallel. The distributed writer
(:mod:`bigmodel.execution.distributed_save`) stages its shards with the same
:func:`stage_shard` on every rank and publishes once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from bigmodel.checkpoint.index import file_metadata, index_bytes
from bigmodel.checkpoint.naming import (
    HF_LAYOUT,
    index_file_name,
    shard_name,
)
from bigmodel.checkpoint.sharding import ShardPlan
from bigmodel.foundations.errors import CheckpointWriteError
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import SaveResult
from bigmodel.storage.commit import Commit
from bigmodel.storage.safetensors import write_safetensors
from bigmodel.storage.torch_bin import write_bin


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


def stage_shard(
    commit: Commit,
    name: str,
    tensors: dict[str, torch.Tensor],
    *,
    safe: bool,
    metadata: dict[str, str],
    digest: str | None,
    digests: dict[str, str],
    on_bytes: Callable[[int], object],
    cast: torch.dtype | None,
) -> None:
    """Write one shard under a temporary name in ``commit``; its digest goes into ``digests``."""
    commit.stage(
        name,
        functools.partial(
            _write_shard,
            name=name,
            tensors=tensors,
            safe=safe,
            metadata=metadata,
            digest=digest,
            digests=digests,
            on_bytes=on_bytes,
            cast=cast,
        ),
    )


def write_planned(
    directory: Path,
    plan: ShardPlan,
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    safe: bool,
    user_meta: dict[str, str],
    aliases: dict[str, str],
    durable: bool,
    digest: str | None,
    dtype: torch.dtype | None,
    progress: bool | None,
    workers: int = 1,
) -> SaveResult:
    """Write the files of ``plan`` into ``directory`` with the commit protocol.

    ``fetch(keys)`` returns one shard's tensors just before the shard is written, so a caller
    whose tensors are not in memory (a DCP checkpoint) holds ``workers`` shards at a time.
    ``workers`` shards are written in parallel.
    """
    count = len(plan.shards)
    names = [shard_name(i, count, safe=safe) for i in range(count)]
    index_name = index_file_name(count, safe=safe)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"save_directory {directory} is a file; pass a folder (it is created if missing)."
        )
    directory.mkdir(parents=True, exist_ok=True)
    file_meta = file_metadata(user_meta, index_name=index_name, aliases=aliases, safe=safe)
    commit = Commit(directory, layout=HF_LAYOUT, durable=durable)
    digests: dict[str, str] = {}
    step = "cleaning up after an earlier interrupted save"
    bar = progress_bar(
        total=plan.total_size, desc=f"Saving {directory.name or directory}", progress=progress
    )
    try:
        commit.lock()
        commit.clean_debris()

        def stage(name: str, keys: list[str]) -> None:
            stage_shard(
                commit,
                name,
                fetch(keys),  # released once written, before this worker fetches another
                safe=safe,
                metadata=file_meta,
                digest=digest,
                digests=digests,
                on_bytes=bar.update,
                cast=dtype,
            )

        step = "writing the shards"
        parallel = min(max(1, workers), count)
        if parallel == 1:
            for name, keys in zip(names, plan.shards, strict=True):
                step = f"writing {name}"
                stage(name, keys)
        else:
            # Shards go to separate files: writes (and fsyncs) of several overlap. The GIL is
            # released during each write, the digest update and the cast kernel.
            with ThreadPoolExecutor(parallel, thread_name_prefix="bigmodel-save") as pool:
                jobs = [
                    pool.submit(stage, name, keys)
                    for name, keys in zip(names, plan.shards, strict=True)
                ]
                try:
                    for job in jobs:
                        job.result()
                except BaseException:
                    for job in jobs:
                        job.cancel()  # shards not started yet are not written at all
                    raise
        if index_name is not None:
            step = f"writing {index_name}"
            commit.stage_bytes(
                index_name, index_bytes(names, plan, user_meta, aliases=aliases, digests=digests)
            )
        step = "publishing the new files"
        commit.publish(index_name)
    except OSError as exc:
        commit.abort()
        if commit.committed:
            raise CheckpointWriteError(
                exc.errno,
                f"The new checkpoint's files are in place in {directory}, but a later step (flushing the "
                f"folder or removing the previous checkpoint's files) failed: {exc.strerror or exc}. Both "
                "versions are complete; until the old files are gone, readers that prefer their layout may "
                "still load them. Fix: save again (it removes leftovers) or delete the stale weight files.",
            ) from exc
        raise CheckpointWriteError(
            exc.errno,
            f"Saving a checkpoint into {directory} failed while {step}: {exc.strerror or exc}. "
            "The previous checkpoint in the folder is intact and the partial files were removed. "
            "Fix: free disk space or fix permissions, then save again.",
        ) from exc
    except BaseException:
        commit.abort()
        raise
    finally:
        commit.unlock()
        bar.close()
    logger.info(
        "saved %d tensors (%d bytes) into %d file(s) in %s",
        sum(len(keys) for keys in plan.shards) + len(aliases),
        plan.total_size,
        count,
        directory,
    )
    return SaveResult(
        directory=directory,
        files=names,
        index_file=index_name,
        total_size=plan.total_size,
        aliases=aliases,
    )
