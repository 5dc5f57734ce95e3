"""Sources of disk-offloaded tensors: the original shards, or converted copies written once.

A tensor that keeps its stored dtype is read straight from the checkpoint's own file mapping
each time it is needed: nothing is rewritten. A tensor that needs a conversion is converted
once, streamed into a safetensors file in ``offload_folder`` (one file per target dtype,
named by bigmodel — tensor names only ever appear inside the file's header, so a hostile
name can never reach the filesystem; see :mod:`bigmodel.storage.scratch`), and read from there.
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
from bigmodel.storage.scratch import write_converted

__all__ = [
    "OffloadedTensor",
    "offload_built",
    "offload_folder_path",
    "offload_sources",
    "offload_state",
    "resident_sources",
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
) -> dict[str, OffloadedTensor]:
    """An :class:`OffloadedTensor` for every module name in ``items`` ((checkpoint key, names))."""
    specs: dict[str, OffloadedTensor] = {}
    to_convert: list[tuple[str, list[str], torch.dtype]] = []
    for key, group in items:
        dtype = dtype_for(group[0], targets[group[0]])
        if ckpt.tensor_info(key).dtype == dtype:
            _describe(
                specs,
                group,
                targets[group[0]],
                functools.partial(ckpt.get_tensor, key),
                dtype,
                source=key,
            )
        else:
            to_convert.append((key, group, dtype))
    if to_convert:
        readers = write_converted(
            offload_folder_path(offload_folder),
            [(key, ckpt.get_tensor(key), dtype) for key, _, dtype in to_convert],
        )
        for key, group, dtype in to_convert:
            _describe(
                specs,
                group,
                targets[group[0]],
                functools.partial(readers[key].get_tensor, key),
                dtype,
                source=key,
            )
    return specs


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
