"""``save_checkpoint``: a module or state dict to a Hugging Face-layout checkpoint folder."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from bigmodel.checkpoint.open import ALIASES_KEY
from bigmodel.checkpoint.sharding import (
    SAFE_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    ShardPlan,
    find_aliases,
    plan_shards,
    shard_name,
)
from bigmodel.execution.distributed import is_dtensor, resolve_group
from bigmodel.foundations.errors import CheckpointWriteError, UnsupportedTensorError
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import SaveResult
from bigmodel.foundations.units import parse_size
from bigmodel.storage.commit import Commit
from bigmodel.storage.digest import DEFAULT_ALGORITHM, DIGEST_KEY, DIGESTS_KEY, new_hasher
from bigmodel.storage.dtypes import stored_dtype, stored_nbytes
from bigmodel.storage.safetensors import NAME_FROM_DTYPE, write_safetensors
from bigmodel.storage.torch_bin import write_bin

__all__ = ["save_checkpoint"]

_RESERVED_METADATA = frozenset({"format", "total_size", ALIASES_KEY, DIGEST_KEY, DIGESTS_KEY})


def _state_dict(
    obj: nn.Module | Mapping[str, torch.Tensor], *, safe: bool, cast: torch.dtype | None
) -> dict[str, torch.Tensor]:
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(state, Mapping):
        raise TypeError(
            f"save_checkpoint expects an nn.Module or a state dict (str -> Tensor), got {type(obj).__name__}."
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise UnsupportedTensorError(
                f"State dict key {name!r} is a {type(name).__name__}; keys must be strings. Fix: rename the entry."
            )
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedTensorError(
                f"State dict entry {name!r} is a {type(tensor).__name__}, not a tensor. Fix: save only tensors; keep other state in a separate file."
            )
        if tensor.device.type == "meta":
            raise UnsupportedTensorError(
                f"Tensor {name!r} is on the meta device and has no data to save. Fix: load or initialise the weights (e.g. bigmodel.load_checkpoint) before saving."
            )
        if tensor.layout != torch.strided:
            raise UnsupportedTensorError(
                f"Tensor {name!r} has layout {tensor.layout}; only dense tensors can be saved. Fix: save tensor.to_dense()."
            )
        if safe and stored_dtype(tensor, cast) not in NAME_FROM_DTYPE:
            raise UnsupportedTensorError(
                f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store. "
                f"Fix: cast it to a supported dtype ({', '.join(str(d) for d in NAME_FROM_DTYPE)}) or pass safe_serialization=False."
            )
        out[name] = tensor.detach()
    return out


def reserved_metadata_keys() -> frozenset[str]:
    """Metadata keys bigmodel writes itself; user metadata must not use them."""
    return _RESERVED_METADATA


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"metadata must map strings to strings (safetensors stores str -> str); offending key: {bad[0]!r}."
        )
    reserved = sorted(_RESERVED_METADATA & set(metadata))
    if reserved:
        raise ValueError(
            f"metadata key(s) {reserved} are written by bigmodel itself; choose other names."
        )
    return dict(metadata)


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
    index_name = (SAFE_INDEX_NAME if safe else WEIGHTS_INDEX_NAME) if count > 1 else None
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"save_directory {directory} is a file; pass a folder (it is created if missing)."
        )
    directory.mkdir(parents=True, exist_ok=True)
    file_meta = file_metadata(user_meta, index_name=index_name, aliases=aliases, safe=safe)
    commit = Commit(directory, durable=durable)
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


def _save_workers(workers: int | None) -> int:
    if workers is None:
        return min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers={workers}: write with at least one thread.")
    return workers


def save_checkpoint(
    obj: nn.Module | Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    digest: str | None = DEFAULT_ALGORITHM,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> SaveResult:
    """Save ``obj`` (a module or state dict) into ``save_directory`` in the Hugging Face layout.

    One shard gives ``model.safetensors`` (``pytorch_model.bin`` with
    ``safe_serialization=False``) and no index; several give ``model-0000k-of-0000N.safetensors``
    plus ``model.safetensors.index.json``. Shards are packed greedily in key order up to
    ``max_shard_size`` (see :func:`bigmodel.parse_size`); a larger tensor gets its own shard.

    Tensors that share storage exactly (tied weights) are written once; the others' names are
    recorded as aliases in the index metadata (or the file's ``__metadata__``) and restored by
    :func:`bigmodel.open_checkpoint`. Extra memory is at most one tensor: contiguous CPU
    tensors are written straight from their memory.

    The save is atomic: files are staged under temporary names and fsync'd (``durable=True``,
    the default; ``durable=False`` skips fsyncs but keeps the atomic publish), then published
    so that at every instant the folder loads as the previous checkpoint or the new one.
    Every artefact of the previous checkpoint (either layout, either format) is then removed;
    other files in the folder (config, tokenizer) are left alone. A second save into the same
    folder while one is running raises :class:`~bigmodel.CheckpointConflictError`.

    ``digest`` (``"xxh3_128"`` by default, ``"sha256"``, or None) names the hash computed while
    writing each file; it is embedded in every safetensors file and listed in the index, and
    :meth:`bigmodel.Checkpoint.verify` / ``open_checkpoint(..., verify=True)`` check it.

    ``dtype`` casts floating-point tensors while they are written, one at a time per shard
    being written (save an fp32 model as bf16 without a second copy in memory); other tensors
    keep their dtype.

    ``workers`` shards are written in parallel (default: up to 4, at most the CPU count); with
    ``dtype`` each worker holds one converted tensor.

    A model with DTensor parameters (``fully_shard`` / ``parallelize_module``), or an explicit
    ``process_group``, makes the save collective: every rank calls this, shards are assigned
    to ranks, each rank gathers and writes its own, and rank 0 publishes the index once all
    are written. The commit is atomic for the whole group; an error on any rank raises
    :class:`~bigmodel.DistributedError` on every rank and leaves the previous checkpoint.
    Without either, the save is this process's alone (the usual ``if rank == 0: save``).
    """
    safe = bool(safe_serialization)
    limit = parse_size(max_shard_size)
    if digest is not None:
        new_hasher(digest)  # an unknown algorithm fails before anything is written
    user_meta = _user_metadata(metadata)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype} is not a floating-point dtype; only floating-point tensors are cast."
        )
    state = _state_dict(obj, safe=safe, cast=dtype)
    # Only a sharded model or an explicit group makes the save collective: a replicated model
    # is commonly saved by rank 0 alone, and that call must not wait for the other ranks.
    sharded = any(is_dtensor(t) for t in state.values())
    group = resolve_group(process_group) if sharded or process_group is not None else None
    if group is not None:
        from bigmodel.execution.distributed_save import save_distributed

        return save_distributed(
            state,
            Path(save_directory),
            group=group,
            limit=limit,
            safe=safe,
            user_meta=user_meta,
            durable=durable,
            digest=digest,
            dtype=dtype,
            progress=progress,
        )
    aliases = find_aliases(state) if safe else {}
    stored = {k: v for k, v in state.items() if k not in aliases}
    plan = plan_shards({k: stored_nbytes(v, dtype) for k, v in stored.items()}, limit)
    return write_planned(
        Path(save_directory),
        plan,
        lambda keys: {k: stored[k] for k in keys},
        workers=_save_workers(workers),
        safe=safe,
        user_meta=user_meta,
        aliases=aliases,
        durable=durable,
        digest=digest,
        dtype=dtype,
        progress=progress,
    )
