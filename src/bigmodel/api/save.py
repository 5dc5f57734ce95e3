"""``save_checkpoint``: a module or state dict to a Hugging Face-layout checkpoint folder."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from bigmodel.checkpoint.index import RESERVED_METADATA
from bigmodel.checkpoint.sharding import ShardPlan, find_aliases
from bigmodel.execution.background import SaveHandle, submit
from bigmodel.execution.distributed import resolve_group
from bigmodel.execution.writing import WriteOptions, plan_files, write_planned
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import UnsupportedTensorError
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import SaveResult
from bigmodel.foundations.units import parse_size
from bigmodel.storage.digest import DEFAULT_ALGORITHM, new_hasher
from bigmodel.storage.dtypes import stored_dtype
from bigmodel.storage.safetensors import NAME_FROM_DTYPE, shape_problem, tensor_name_problem

__all__ = ["PlannedSave", "plan_state", "save_checkpoint"]


#: Sub-byte integer dtypes: neither format has a way to store them (torch.save refuses them).
_SUB_BYTE = re.compile(r"^u?int[1-7]$")


def _entry_problem(
    name: object, tensor: object, *, safe: bool, cast: torch.dtype | None
) -> str | None:
    """Why the state-dict entry cannot be written, with the fix; None if it can."""
    if not isinstance(name, str):
        return (
            f"key {name!r} is a {type(name).__name__}; keys must be strings. Fix: rename the entry."
        )
    if safe and (problem := tensor_name_problem(name)) is not None:
        return f"key {name!r} {problem}, so safetensors cannot store it. Fix: rename the entry, or pass safe_serialization=False."
    if not isinstance(tensor, torch.Tensor):
        return f"entry {name!r} is a {type(tensor).__name__}, not a tensor. Fix: save only tensors; keep other state in a separate file."
    if tensor.device.type == "meta":
        return f"tensor {name!r} is on the meta device and has no data to save. Fix: load or initialise the weights (e.g. bigmodel.load_checkpoint) before saving."
    if tensor.is_nested:
        return f"tensor {name!r} is a nested tensor; only dense tensors can be saved. Fix: save its components (tensor.unbind()) under their own names."
    if tensor.layout != torch.strided:
        return f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be saved. Fix: save tensor.to_dense()."
    dtype = stored_dtype(tensor, cast)
    if _SUB_BYTE.match(str(dtype).removeprefix("torch.")):
        return f"tensor {name!r} has dtype {dtype}, which packs elements below a byte; no checkpoint format stores it. Fix: pack it into uint8 yourself, or cast it."
    if safe and dtype not in NAME_FROM_DTYPE:
        supported = ", ".join(str(d) for d in NAME_FROM_DTYPE)
        return f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store. Fix: cast it to a supported dtype ({supported}) or pass safe_serialization=False."
    if safe and (problem := shape_problem(tensor.shape)) is not None:
        return f"tensor {name!r} has shape {list(tensor.shape)}, which {problem}. Fix: reshape it."
    return None


def _state_dict(
    obj: nn.Module | Mapping[str, torch.Tensor], *, safe: bool, cast: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The state to save, each entry checked before anything is written."""
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(state, Mapping):
        raise TypeError(
            f"save_checkpoint expects an nn.Module or a state dict (str -> Tensor), got {type(obj).__name__}."
        )
    for name, tensor in state.items():
        problem = _entry_problem(name, tensor, safe=safe, cast=cast)
        if problem is not None:
            raise UnsupportedTensorError(f"State dict {problem}")
    return {name: tensor.detach() for name, tensor in state.items()}


def original_state(obj: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The state dict of a transformers model in the layout its checkpoints are published in
    (what ``save_pretrained`` writes by default), through the reverse of the conversions
    the model applies when it loads (see :mod:`bigmodel.placement.conversions`): fused
    experts are split back into one tensor per expert, renamed keys get their old names. The
    reverse operations give views where they can (splits, chunks): no second copy."""
    if not isinstance(obj, nn.Module):
        raise TypeError("original_layout=True needs the model itself, not a state dict.")
    if "transformers" not in sys.modules:
        return obj.state_dict()  # not a transformers model: its layout is the only one
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(obj, PreTrainedModel):
        return obj.state_dict()
    reverted: Mapping[str, torch.Tensor] = revert_weight_conversion(obj, obj.state_dict())
    return reverted


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(
            f"metadata must map strings to strings (safetensors stores str -> str); offending key: {bad[0]!r}."
        )
    reserved = sorted(RESERVED_METADATA & set(metadata))
    if reserved:
        raise ValueError(
            f"metadata key(s) {reserved} are written by bigmodel itself; choose other names."
        )
    return dict(metadata)


@overload
def save_checkpoint(
    obj: nn.Module | Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = ...,
    safe_serialization: bool = ...,
    metadata: Mapping[str, str] | None = ...,
    durable: bool = ...,
    digest: str | None = ...,
    dtype: torch.dtype | str | None = ...,
    process_group: Any = ...,
    workers: int | None = ...,
    progress: bool | None = ...,
    original_layout: bool = ...,
    background: Literal[False] = ...,
    staging_memory: int | str | None = ...,
) -> SaveResult: ...


@overload
def save_checkpoint(
    obj: nn.Module | Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = ...,
    safe_serialization: bool = ...,
    metadata: Mapping[str, str] | None = ...,
    durable: bool = ...,
    digest: str | None = ...,
    dtype: torch.dtype | str | None = ...,
    process_group: Any = ...,
    workers: int | None = ...,
    progress: bool | None = ...,
    original_layout: bool = ...,
    background: Literal[True],
    staging_memory: int | str | None = ...,
) -> SaveHandle[SaveResult]: ...


def save_checkpoint(
    obj: nn.Module | Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    digest: str | None = DEFAULT_ALGORITHM,
    dtype: torch.dtype | str | None = None,
    process_group: Any = None,
    workers: int | None = None,
    progress: bool | None = None,
    original_layout: bool = False,
    background: bool = False,
    staging_memory: int | str | None = None,
) -> SaveResult | SaveHandle[SaveResult]:
    """Save ``obj`` (a module or state dict) into ``save_directory`` in the Hugging Face layout.

    One shard gives ``model.safetensors`` (``pytorch_model.bin`` with
    ``safe_serialization=False``) and no index; several give ``model-0000k-of-0000N.safetensors``
    plus ``model.safetensors.index.json``. Shards are packed greedily in key order up to
    ``max_shard_size`` (see :func:`bigmodel.parse_size`); a larger tensor gets its own shard.

    In safetensors, tensors that share storage exactly (tied weights) are written once; the
    others' names are recorded as aliases in the index metadata (or the file's
    ``__metadata__``) and restored by :func:`bigmodel.open_checkpoint`. With
    ``safe_serialization=False`` every name is written, as transformers does (a ``.bin`` has
    no place for aliases): ``torch.save`` keeps tied names that land in one file as one
    storage, but tied names packed into different shards are each stored in full. Extra memory is at most one tensor: contiguous CPU
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

    ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``) casts floating-point tensors while they are written, one at a time per shard
    being written (save an fp32 model as bf16 without a second copy in memory); other tensors
    keep their dtype.

    ``workers`` shards are written in parallel (default: up to 4, at most the CPU count); with
    ``dtype`` each worker holds one converted tensor.

    ``original_layout=True`` saves a transformers model in the layout its checkpoints are
    published in (what ``save_pretrained`` writes by default, and what older transformers
    versions and other tools read): the model's load-time conversions are reversed (fused
    experts split per expert, renamed keys back to their old names). Loading such a
    checkpoint converts it again (:func:`bigmodel.load_checkpoint`).

    ``background=True`` returns a :class:`~bigmodel.SaveHandle` as soon as the tensors are
    copied into staging memory (the caller may change them from then on); a worker thread
    writes, hashes, fsyncs and commits them as above. ``handle.wait()`` returns this
    :class:`~bigmodel.SaveResult` or re-raises the worker's error; ``handle.done()`` says
    whether it is durable. One background save runs at a time: a new one first waits for
    the previous. Staging memory is one buffer per process, reused between saves, of the
    size of what is written (tied tensors once; a cast to a smaller ``dtype`` applied while
    staging); ``staging_memory`` caps it: a larger state is not staged but written before
    the call returns (with a warning). A process that exits normally finishes the save in
    flight; one killed mid-save leaves the previous checkpoint. Tensors on CUDA are staged
    in pinned memory on a side stream.

    A collective save (below) runs in the background too: every rank stages its own pieces
    (a DTensor's local shard; a plain tensor only on the rank that writes it) and returns;
    a worker thread per rank then gathers, writes and commits over a separate gloo group
    (made on the first such call, collectively, and kept), so the training loop's own
    collectives never interleave with the save's. A failure on any rank, staging included,
    makes every rank's ``handle.wait()`` raise :class:`~bigmodel.DistributedError` naming it.

    A model with DTensor parameters (``fully_shard`` / ``parallelize_module``), or an explicit
    ``process_group``, makes the save collective: every rank calls this, shards are assigned
    to ranks, each rank gathers and writes its own, and rank 0 publishes the index once all
    are written. The commit is atomic for the whole group; an error on any rank raises
    :class:`~bigmodel.DistributedError` on every rank and leaves the previous checkpoint.
    Without either, the save is this process's alone (the usual ``if rank == 0: save``).
    """
    dtype = parse_dtype(dtype)
    safe = bool(safe_serialization)
    limit = parse_size(max_shard_size)
    bound = None if staging_memory is None else parse_size(staging_memory)
    if digest is not None:
        new_hasher(digest)  # an unknown algorithm fails before anything is written
    user_meta = _user_metadata(metadata)
    state = _state_dict(original_state(obj) if original_layout else obj, safe=safe, cast=dtype)
    opts = WriteOptions(
        safe=safe,
        user_meta=user_meta,
        durable=durable,
        digest=digest,
        dtype=dtype,
        progress=progress,
    )
    # Only a sharded model or an explicit group makes the save collective: a replicated model
    # is commonly saved by rank 0 alone, and that call must not wait for the other ranks.
    sharded = any(is_dtensor(t) for t in state.values())
    group = resolve_group(process_group) if sharded or process_group is not None else None
    if group is not None:
        from bigmodel.execution.distributed_save import save_distributed, submit_distributed

        if background:
            return submit_distributed(
                state, Path(save_directory), opts, group=group, limit=limit, staging_memory=bound
            )
        return save_distributed(state, Path(save_directory), opts, group=group, limit=limit)
    planned = plan_state(state, limit, opts)
    directory = Path(save_directory)
    count = _save_workers(workers)
    if not background:
        return planned.write(directory, planned.stored, count)
    return submit(
        directory,
        planned.stored,
        lambda staged: planned.write(directory, staged, count),
        cast=dtype,
        staging_memory=bound,
    )


@dataclass(frozen=True)
class PlannedSave:
    """A single-process save, planned: the tensors to store and how they are packed."""

    stored: dict[str, torch.Tensor]
    plan: ShardPlan
    opts: WriteOptions

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], workers: int
    ) -> SaveResult:
        """Write ``tensors`` (the stored tensors, or their staged copies) with the commit protocol."""
        return write_planned(
            directory,
            self.plan,
            lambda keys: {k: tensors[k] for k in keys},
            self.opts,
            workers=workers,
        )


def plan_state(state: dict[str, torch.Tensor], limit: int, opts: WriteOptions) -> PlannedSave:
    """Deduplicate tied tensors (safetensors only) and pack the rest into shards."""
    aliases = find_aliases(state) if opts.safe else {}
    stored = {k: v for k, v in state.items() if k not in aliases}
    opts = dataclasses.replace(opts, aliases=aliases)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()}
    return PlannedSave(stored, plan_files(specs, limit, opts), opts)


def _save_workers(workers: int | None) -> int:
    if workers is None:
        return min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers={workers}: write with at least one thread.")
    return workers
