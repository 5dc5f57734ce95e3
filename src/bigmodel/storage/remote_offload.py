"""Offloaded tensors of a checkpoint under a URL, written once into the offload folder.

A remote file cannot be mapped, so a disk-offloaded tensor of a remote checkpoint is fetched
once and written into a scratch safetensors file in the offload folder (one file per target
dtype, named by bigmodel: a tensor name never reaches the filesystem), which the offload hooks
then map. The bytes come through the load's own scheduler
(:func:`~bigmodel.storage.remote_read.remote_tensors`): concurrent range requests bounded by
the in-flight bytes, each tensor written at its place in its file (``pwrite``, cast if asked)
as soon as it arrives and then dropped, so memory beyond the final model stays within that
bound, whatever the size of the offloaded part.

Each file's header is written first, from the shapes and dtypes the checkpoint's headers
announce (the same encoder and order as :func:`~bigmodel.storage.safetensors.write_safetensors`),
and the file appears under its final name only when every tensor is in it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigmodel.storage.atomic import open_temp
from bigmodel.storage.dtypes import stored_dtype, stored_nbytes
from bigmodel.storage.remote import RemoteFolder
from bigmodel.storage.remote_read import RemoteRange, remote_tensors
from bigmodel.storage.safetensors import SafetensorsFile, header_bytes
from bigmodel.storage.scratch import scratch_paths

__all__ = ["write_remote_offload"]


@dataclass
class _Out:
    """One scratch file being written: where each tensor's bytes go in it."""

    final: Path
    temp: Path
    dtype: torch.dtype
    offsets: dict[str, int] = field(default_factory=dict)
    fd: int = -1


def _layout(
    folder: Path, label: str, dtype: torch.dtype, items: list[RemoteRange]
) -> tuple[_Out, bytes]:
    """A new scratch file's header and each tensor's offset in it, from the announced shapes."""
    placeholders = [
        (item.key, torch.empty(item.shape, dtype=item.dtype, device="meta")) for item in items
    ]
    header, ordered = header_bytes(placeholders, {"format": "pt"}, cast=dtype)
    out = _Out(*scratch_paths(folder, dtype, label), dtype)
    at = len(header)
    for name, placeholder in ordered:
        out.offsets[name] = at
        at += stored_nbytes(placeholder, dtype)
    return out, header


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    """Write every byte of ``data`` at ``at`` in ``fd``."""
    written = 0
    while written < len(data):
        done = os.pwrite(fd, data[written:], at + written)
        if done == 0:
            raise OSError(f"writing the offload file at {at + written} made no progress")
        written += done


def _store(out: _Out, key: str, tensor: torch.Tensor) -> None:
    """Write ``tensor`` (cast to the file's dtype if it is floating point) at its offset."""
    if not tensor.numel():
        return
    value = tensor.to(stored_dtype(tensor, out.dtype)).contiguous().reshape(-1)
    _pwrite_all(out.fd, value.view(torch.uint8).numpy().data.cast("B"), out.offsets[key])


def write_remote_offload(
    folder: Path,
    remote: RemoteFolder,
    items: list[tuple[RemoteRange, torch.dtype]],
    *,
    max_inflight_bytes: int,
    label: str = "offload",
) -> dict[str, SafetensorsFile]:
    """Fetch every ``(range, target dtype)`` of ``remote`` with the load's scheduler (at most
    ``max_inflight_bytes`` requested ahead of the tensor being written) and write it once into
    ``folder``, one scratch file per target dtype; return the reader of each tensor's key."""
    by_dtype: dict[torch.dtype, list[RemoteRange]] = {}
    for item, dtype in items:
        by_dtype.setdefault(dtype, []).append(item)
    outs: dict[str, _Out] = {}
    files: list[_Out] = []
    with contextlib.ExitStack() as stack:
        for dtype, ranges in by_dtype.items():
            out, header = _layout(folder, label, dtype, ranges)
            out.fd = stack.enter_context(open_temp(out.temp, durable=False)).fileno()
            _pwrite_all(out.fd, memoryview(header), 0)
            files.append(out)
            outs.update(dict.fromkeys((r.key for r in ranges), out))
        stream = stack.enter_context(
            contextlib.closing(
                remote_tensors(
                    remote,
                    [item for item, _ in items],
                    max_inflight_bytes=max_inflight_bytes,
                    dtypes=[dtype for _, dtype in items],  # cast as the bytes arrive
                )
            )
        )
        for key, tensor in stream:
            _store(outs[key], key, tensor)
            del tensor  # its memory goes back before the next one is taken
    readers: dict[str, SafetensorsFile] = {}
    for out in files:
        os.replace(out.temp, out.final)
        reader = SafetensorsFile(out.final)
        readers.update(dict.fromkeys((k for k, o in outs.items() if o is out), reader))
    return readers
