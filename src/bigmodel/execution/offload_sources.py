"""Sources of disk-offloaded tensors: the original shards, or converted copies written once.

A tensor that keeps its stored dtype is read straight from the checkpoint's own file mapping
each time it is needed: nothing is rewritten. A tensor that needs a conversion is converted
once, streamed into a safetensors file in ``offload_folder`` (one file per target dtype,
named by bigmodel — tensor names only ever appear inside the file's header, so a hostile
name can never reach the filesystem; see :mod:`bigmodel.storage.scratch`), and read from there.
A checkpoint under a URL cannot be mapped: every one of its offloaded tensors is written once
into ``offload_folder`` (read back by mapping), so forwards read local files and never the
network. They are fetched by the load's own concurrent range-request scheduler, bounded by the
load's in-flight bytes, and each is written as it arrives
(:mod:`bigmodel.storage.remote_offload`).

When a device map sends modules to disk, the tensors of its ``cpu`` entries are given private
memory (:func:`keep_resident`): left as views of the file mapping they would be page cache,
which the kernel evicts to make room for the disk modules streamed on every forward, so the
CPU budget would be streamed too. The file pages read for the copy are unmapped right after it
(:func:`~bigmodel.storage.readahead.drop_pages`): they stay clean page cache, which the kernel
reclaims far more cheaply than mapped pages when the streamed units need the memory.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.foundations.types import IOOptions
from bigmodel.placement.device_map import device_for
from bigmodel.storage.readahead import FileMappings, drop_pages
from bigmodel.storage.remote_offload import write_remote_offload
from bigmodel.storage.safetensors import SafetensorsFile
from bigmodel.storage.scratch import write_converted

__all__ = [
    "OffloadedTensor",
    "offload_built",
    "offload_folder_path",
    "offload_sources",
    "offload_state",
    "resident_sources",
    "keep_resident",
]


@dataclass(frozen=True)
class OffloadedTensor:
    """Where an offloaded tensor's data comes from, and what it must become.

    Names with the same ``source`` (tied weights) are materialised once when they are needed
    together. ``nbytes`` is the size once materialised (what prefetch counts in flight).
    """

    load: Callable[[], torch.Tensor]  # returns a CPU tensor (usually a view of a file mapping)
    dtype: torch.dtype
    is_parameter: bool
    requires_grad: bool = False
    source: str = ""
    nbytes: int = 0


def offload_folder_path(offload_folder: str | os.PathLike[str] | None) -> Path:
    """``offload_folder``, created if missing, or a temporary folder removed at exit."""
    if offload_folder is not None:
        path = Path(offload_folder)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix="bigmodel-offload-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def offload_sources(
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    items: list[tuple[str, list[str]]],
    dtype_for: Callable[[str, torch.Tensor], torch.dtype],
    offload_folder: str | os.PathLike[str] | None,
    *,
    inflight_bytes: int | None = None,
) -> dict[str, OffloadedTensor]:
    """An :class:`OffloadedTensor` for every module name in ``items`` ((checkpoint key, names)).

    Same-dtype tensors of a local checkpoint are read from its mapping; the others (a new
    dtype, or any tensor of a remote checkpoint) are written once into ``offload_folder``.
    ``inflight_bytes`` bounds a remote checkpoint's reads ahead (the load's
    ``IOOptions.inflight_bytes``)."""
    specs: dict[str, OffloadedTensor] = {}
    to_write: list[tuple[str, list[str], torch.dtype]] = []
    for key, group in items:
        dtype = dtype_for(group[0], targets[group[0]])
        if ckpt.tensor_info(key).dtype == dtype and not ckpt.is_remote:
            _describe(
                specs,
                group,
                targets[group[0]],
                functools.partial(ckpt.get_tensor, key),
                dtype,
                source=key,
            )
        else:
            to_write.append((key, group, dtype))
    if to_write:
        folder = offload_folder_path(offload_folder)
        readers = _write(ckpt, folder, to_write, inflight_bytes)
        for key, group, dtype in to_write:
            _describe(
                specs,
                group,
                targets[group[0]],
                functools.partial(readers[key].get_tensor, key),
                dtype,
                source=key,
            )
    return specs


def _write(
    ckpt: Checkpoint,
    folder: Path,
    items: list[tuple[str, list[str], torch.dtype]],
    inflight_bytes: int | None,
) -> dict[str, SafetensorsFile]:
    """Write ``items`` (key, names, target dtype) once into ``folder``. A local checkpoint's
    tensors are views of its mapping (fetching them costs no memory); a remote one's come
    through the load's range-request scheduler, within ``inflight_bytes`` (default: the
    default :class:`~bigmodel.IOOptions`' bound)."""
    if ckpt.remote is None:
        return write_converted(
            folder, [(key, ckpt.get_tensor(key), dtype) for key, _, dtype in items]
        )
    return write_remote_offload(
        folder,
        ckpt.remote,
        [(ckpt.remote_range(key), dtype) for key, _, dtype in items],
        max_inflight_bytes=IOOptions().inflight if inflight_bytes is None else inflight_bytes,
    )


def offload_built(
    built: Mapping[str, torch.Tensor],
    names: Mapping[str, list[str]],
    targets: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    folder: Path,
) -> dict[str, OffloadedTensor]:
    """Write tensors that conversions built (one group) once into ``folder``, at ``dtype``,
    and describe them under every name in ``names[name]``: their hooks read them from there."""
    items = [(name, value, dtype) for name, value in built.items()]
    readers = write_converted(folder, items, label="offload-converted")
    specs: dict[str, OffloadedTensor] = {}
    for name in built:
        load = functools.partial(readers[name].get_tensor, name)
        _describe(specs, names[name], targets[name], load, dtype, source=name)
    return specs


def _describe(
    specs: dict[str, OffloadedTensor],
    names: list[str],
    target: torch.Tensor,
    load: Callable[[], torch.Tensor],
    dtype: torch.dtype,
    *,
    source: str,
) -> None:
    for name in names:
        specs[name] = OffloadedTensor(
            load=load,
            dtype=dtype,
            is_parameter=isinstance(target, nn.Parameter),
            requires_grad=target.requires_grad,
            source=source,
            nbytes=target.numel() * dtype.itemsize,
        )


def offload_state(
    state: dict[str, torch.Tensor], offload_folder: str | os.PathLike[str] | None
) -> dict[str, OffloadedTensor]:
    """Write the tensors of a loaded model that go to disk (tied names once) and describe them."""
    unique: dict[int, str] = {}
    for name, tensor in state.items():
        unique.setdefault(id(tensor), name)
    folder = offload_folder_path(offload_folder)
    readers = write_converted(
        folder, [(n, state[n], state[n].dtype) for n in unique.values()], label="offload-state"
    )
    specs: dict[str, OffloadedTensor] = {}
    for name, tensor in state.items():
        _describe(
            specs,
            [name],
            tensor,
            functools.partial(readers[unique[id(tensor)]].get_tensor, unique[id(tensor)]),
            tensor.dtype,
            source=unique[id(tensor)],
        )
    return specs


def resident_sources(state: dict[str, torch.Tensor]) -> dict[str, OffloadedTensor]:
    """Describe tensors kept in CPU memory that run on an accelerator (tied names once).

    The CPU tensor itself is the source; each forward copies it to the execution device.
    """
    unique: dict[int, str] = {}
    for name, tensor in state.items():
        unique.setdefault(id(tensor), name)
    specs: dict[str, OffloadedTensor] = {}
    for name, tensor in state.items():
        data = tensor.detach()
        _describe(
            specs,
            [name],
            tensor,
            functools.partial(_identity, data),
            tensor.dtype,
            source=unique[id(tensor)],
        )
    return specs


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def keep_resident(model: nn.Module, device_map: Mapping[str, str]) -> int:
    """Copy into private memory the tensors of ``cpu`` entries that are views of a file mapping,
    when ``device_map`` sends something to disk (only then: a same-dtype CPU load without disk
    offload stays zero copy). Tied tensors are copied once and stay tied (a parameter keeps its
    identity; only its data is replaced); the file pages of each copied view are unmapped.
    Returns the bytes copied."""
    if "disk" not in device_map.values():
        return 0
    mappings = FileMappings()
    done: set[int] = set()
    copied = 0
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for slots in (module._parameters, module._buffers):
            for leaf, tensor in slots.items():
                if tensor is None or id(tensor) in done:
                    continue
                if device_for(prefix + leaf, device_map) != "cpu" or not mappings.holds(tensor):
                    continue
                done.add(id(tensor))
                view = tensor.data
                tensor.data = view.clone()
                drop_pages([view])  # unmapped, the pages read for the copy are cheap to reclaim
                copied += tensor.numel() * tensor.element_size()
    return copied
