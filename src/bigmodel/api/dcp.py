"""``torch.distributed.checkpoint`` (DCP) folders to the Hugging Face layout and back.

DCP is torch's format for distributed training checkpoints: a pickled ``.metadata`` file and
``*.distcp`` data files. Reading it goes through torch's own reader (``FileSystemReader`` and
``dcp.load``), one shard of the output at a time, so memory stays bounded by
``max_shard_size`` whatever the model size; integer and bool tensors are handled like any
other (torch's ``dcp_to_torch_save`` consolidation fails on them).

``.metadata`` is a pickle: unpickling a file from a stranger can run arbitrary code, so
reading a DCP folder requires ``trusted=True`` from the caller. (The tensor data itself is
read with ``torch.load(weights_only=True)`` by torch.)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.execution.writing import WriteOptions, plan_files, write_planned
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import CheckpointNotFoundError, UnsafeCheckpointError
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import SaveResult
from bigmodel.foundations.units import parse_size
from bigmodel.storage.safetensors import NAME_FROM_DTYPE

__all__ = ["DcpEntry", "dcp_to_hf", "hf_to_dcp", "read_dcp_metadata"]

METADATA_NAME = ".metadata"


@dataclass(frozen=True)
class DcpEntry:
    """One tensor of a DCP checkpoint, as its metadata describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check_folder(path: Path) -> None:
    if not (path / METADATA_NAME).is_file():
        raise CheckpointNotFoundError(
            f"{path} is not a torch.distributed.checkpoint folder: it has no {METADATA_NAME} file "
            f"[{CheckpointNotFoundError.code}]. Fix: pass the folder dcp.save() wrote."
        )


def read_dcp_metadata(
    path: str | os.PathLike[str], *, trusted: bool = False
) -> tuple[dict[str, DcpEntry], list[str]]:
    """The tensors of a DCP folder (name -> :class:`DcpEntry`) and the names of its non-tensor
    entries (counters, RNG states; they have no place in a weights checkpoint).

    ``trusted=True`` is required: DCP metadata is a pickle.
    """
    folder = Path(path)
    _check_folder(folder)
    if not trusted:
        raise UnsafeCheckpointError.one(
            str(folder / METADATA_NAME),
            "untrusted-pickle",
            "DCP metadata is a Python pickle, and unpickling can run arbitrary code.",
            hint="pass trusted=True (--trusted on the command line) only if you trust whoever wrote this folder.",
        )
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    tensors: dict[str, DcpEntry] = {}
    others: list[str] = []
    for name, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            tensors[name] = DcpEntry(name, item.properties.dtype, tuple(item.size))
        else:
            others.append(name)
    return tensors, others


def dcp_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    trusted: bool = False,
    prefix: str = "",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    durable: bool = True,
    progress: bool | None = None,
) -> SaveResult:
    """Write the tensors of the DCP folder ``src`` as a Hugging Face checkpoint in ``dst``.

    ``prefix`` keeps only the entries under it and removes it from their names (DCP flattens
    ``{"model": ..., "optim": ...}`` into ``model.layer.weight``: pass ``prefix="model."``).
    One output shard is read at a time, so memory is bounded by ``max_shard_size``. ``dtype``
    casts floating-point tensors as they are written. Non-tensor entries are skipped (logged).
    """
    dtype = parse_dtype(dtype)
    folder = Path(src)
    entries, others = read_dcp_metadata(folder, trusted=trusted)
    if others:
        logger.info("%s: skipping %d non-tensor entries (%s)", folder, len(others), others[:5])
    selected = {
        name.removeprefix(prefix): entry
        for name, entry in entries.items()
        if name.startswith(prefix)
    }
    if not selected:
        raise CheckpointNotFoundError(
            f"{folder} holds no tensor whose name starts with {prefix!r} "
            f"[{CheckpointNotFoundError.code}]; its names start like: "
            f"{sorted(entries)[:5]}. Fix: pass the prefix they share (e.g. prefix='model.')."
        )
    unsupported = sorted(n for n, e in selected.items() if e.dtype not in NAME_FROM_DTYPE)
    if unsupported:
        raise ValueError(
            f"{folder}: tensor {unsupported[0]!r} has a dtype safetensors cannot store "
            f"({selected[unsupported[0]].dtype}). Fix: select other entries with prefix=."
        )
    opts = WriteOptions(durable=durable, digest="xxh3_128", dtype=dtype, progress=progress)
    specs = {n: (e.dtype, e.shape) for n, e in selected.items()}
    plan = plan_files(specs, parse_size(max_shard_size), opts)

    def fetch(keys: list[str]) -> dict[str, torch.Tensor]:
        return _read_dcp(folder, {k: selected[k] for k in keys}, prefix)

    return write_planned(
        Path(dst),
        plan,
        fetch,
        opts,
    )


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP warns that it assumes a single process; here that is the intent, not an accident."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _read_dcp(folder: Path, wanted: dict[str, DcpEntry], prefix: str) -> dict[str, torch.Tensor]:
    """Read ``wanted`` (output names) from the DCP folder with torch's own loader."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    state = {
        prefix + name: torch.empty(entry.shape, dtype=entry.dtype) for name, entry in wanted.items()
    }
    with _single_process():
        state_dict_loader.load(state, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return {name: state[prefix + name] for name in wanted}


def hf_to_dcp(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    prefix: str = "",
) -> Path:
    """Write the checkpoint at ``src`` (any layout bigmodel opens) as a DCP folder ``dst``.

    Tensors are handed to ``dcp.save`` as views of the source's file mapping, so no private
    copy of the model is made. ``prefix`` is prepended to every name (``"model."`` to match a
    training script that saves ``{"model": model.state_dict()}``).
    """
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    target = Path(dst)
    with open_checkpoint(src) as ckpt:
        state: dict[str, Any] = {prefix + name: ckpt.get_tensor(name) for name in ckpt.keys()}
        with _single_process():
            state_dict_saver.save(state, storage_writer=FileSystemWriter(str(target)), no_dist=True)
    return target
