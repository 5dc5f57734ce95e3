"""Rewriting a checkpoint on disk (reshard, convert, cast) with memory bounded by one tensor."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from bigmodel.api.save import save_checkpoint
from bigmodel.checkpoint.index import RESERVED_METADATA
from bigmodel.checkpoint.naming import is_weights_artifact
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.types import RewriteResult
from bigmodel.storage.commit import is_ours

__all__ = ["rewrite_checkpoint"]


def rewrite_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str,
    safe_serialization: bool | None = None,
    dtype: torch.dtype | str | None = None,
    copy_extras: bool = True,
    progress: bool | None = None,
) -> RewriteResult:
    """Write the checkpoint at ``src`` again at ``dst`` with new shards, format or dtype.

    Tensors stream from the source's file mapping into the new files one at a time (page
    cache only; with ``dtype``, one converted tensor at a time). ``safe_serialization=None``
    keeps the source format. Tied tensors are written once in safetensors (a ``.bin`` target
    writes every name, as :func:`~bigmodel.save_checkpoint` does). String metadata of the
    source is kept. With ``copy_extras``, the other files of the source folder (config,
    tokenizer, README) are copied when ``dst`` is another folder; a file ``dst`` already has is
    kept, and subfolders are not copied: a warning names both.
    ``dst`` may be ``src`` itself: the save is atomic.
    """
    dtype = parse_dtype(dtype)
    with open_checkpoint(src) as ckpt:
        safe = ckpt.format == "safetensors" if safe_serialization is None else safe_serialization
        state = {name: ckpt.get_tensor(name) for name in ckpt.keys()}
        metadata = {
            k: v
            for k, v in ckpt.metadata.items()
            if isinstance(v, str) and k not in RESERVED_METADATA
        }
        saved = save_checkpoint(
            state,
            dst,
            max_shard_size=max_shard_size,
            safe_serialization=safe,
            metadata=metadata or None,
            dtype=dtype,
            progress=progress,
        )
        source_dir, source_format = ckpt.directory, ckpt.format
    target = Path(dst)
    copied: list[str] = []
    if copy_extras and source_dir.resolve() != target.resolve():
        copied = _copy_extras(source_dir, target)
    return RewriteResult(saved=saved, source_format=source_format, copied_files=copied)


def _copy_extras(source_dir: Path, target: Path) -> list[str]:
    """Copy the files of ``source_dir`` that are not weights into ``target``; return their
    names. What is left out (files ``target`` already has, folders) is named in a warning,
    never skipped silently."""
    copied: list[str] = []
    kept: list[str] = []
    folders: list[str] = []
    for entry in sorted(source_dir.iterdir()):
        if is_weights_artifact(entry.name) or is_ours(entry.name):
            continue
        if entry.is_dir():
            folders.append(entry.name + "/")
        elif not entry.is_file():
            continue
        elif (target / entry.name).exists():
            kept.append(entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
            copied.append(entry.name)
    if kept or folders:
        parts = [f"kept {target}'s own {', '.join(kept)}"] if kept else []
        parts += [f"did not copy the folder(s) {', '.join(folders)}"] if folders else []
        warnings.warn(
            f"Rewriting {source_dir} into {target}: {'; '.join(parts)}. Fix: copy what the "
            "model needs by hand (say, cp -r) if it differs.",
            stacklevel=3,
        )
    return copied
