"""Scratch files: converted tensors written once for bigmodel's own later reads (offload
folders, a node's shared converted copy). Not checkpoints: no index, no fsync, names chosen by
bigmodel (a tensor name never reaches the filesystem), complete or absent (temporary name,
then rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from bigmodel.storage.atomic import new_token, open_temp
from bigmodel.storage.safetensors import SafetensorsFile, write_safetensors

__all__ = ["scratch_paths", "write_converted"]


def write_converted(
    folder: Path,
    items: Iterable[tuple[str, torch.Tensor, torch.dtype]],
    *,
    label: str = "offload",
) -> dict[str, SafetensorsFile]:
    """Write (name, tensor, target dtype) items into ``folder``, one safetensors file per target
    dtype, each converted as it is written (one converted tensor in memory at a time); return
    the reader of each name. Files are named by bigmodel, never after a tensor, and appear
    complete or not at all (written under a temporary name, then renamed; no fsync: scratch)."""
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor, dtype in items:
        by_dtype.setdefault(dtype, []).append((name, tensor))
    readers: dict[str, SafetensorsFile] = {}
    for dtype, tensors in by_dtype.items():
        final, temp = scratch_paths(folder, dtype, label)
        with open_temp(temp, durable=False) as fh:
            write_safetensors(fh, tensors, {"format": "pt"}, cast=dtype)
        os.replace(temp, final)
        reader = SafetensorsFile(final)
        readers.update(dict.fromkeys((name for name, _ in tensors), reader))
    return readers


def scratch_paths(folder: Path, dtype: torch.dtype, label: str) -> tuple[Path, Path]:
    """(final, temporary) path of a new scratch file of ``dtype`` tensors in ``folder``: named
    by bigmodel (label, dtype, a fresh token), written under the temporary name, then renamed."""
    kind = str(dtype).removeprefix("torch.")
    final = folder / f"{label}-{kind}-{new_token()}.safetensors"
    return final, folder / f".{final.name}.tmp"
