"""Running a model whose weights do not all fit: per-module hooks, disk offload, prefetch.

Modules whose weights live on ``disk`` keep ``meta`` placeholders. Just before such a module
runs, a forward pre-hook puts its real tensors in place (read from the original checkpoint
shard when no conversion is needed — a view of the file mapping, so no private memory — or
from ``offload_folder`` where converted copies were written once); right after, a forward
hook puts the placeholders back, so the weights are released. Inputs are moved to the
module's execution device and outputs back to the caller's.

Prefetch: the device map's entries run in order; when entry *i* starts, entry *i + 1*'s
tensors are read in a background thread (at most one entry in flight), so disk reads overlap
compute.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .device_map import covering_key, device_for, normalize_device
from .offload import OffloadedTensor, offload_state

__all__ = ["Offloader", "attach_offload_hooks", "dispatch_model"]


class Offloader:
    """Owns the offloaded tensors of one model and the hooks that bring them in and out."""

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, OffloadedTensor],
        device_map: Mapping[str, str],
        *,
        execution_device: torch.device,
        prefetch: bool = True,
    ) -> None:
        self.model = model
        self.tensors = dict(tensors)
        self.execution_device = execution_device
        self.prefetch = prefetch
        self.handles: list[RemovableHandle] = []
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-prefetch")
            if prefetch
            else None
        )
        self._pending: dict[int, Future[dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        owners = {name: covering_key(name, device_map) for name in self.tensors}
        order = {key: i for i, key in enumerate(device_map)}
        keys = sorted({k for k in owners.values() if k is not None}, key=order.__getitem__)
        self._keys = keys  # device-map entries with offloaded tensors, in run order
        index = {k: i for i, k in enumerate(keys)}
        self._entry_of: dict[str, int] = {}
        for name, key in owners.items():
            if key is None:
                raise ValueError(
                    f"The device map places no entry over {name!r}; add it (or an ancestor, or '') to device_map."
                )
            self._entry_of[name] = index[key]
        by_module: dict[str, dict[str, str]] = {}
        for name in self.tensors:
            module_name, _, leaf = name.rpartition(".")
            by_module.setdefault(module_name, {})[leaf] = name
        for module_name, leaves in by_module.items():
            module = model.get_submodule(module_name)
            entry = self._entry_of[next(iter(leaves.values()))]
            self.handles.append(
                module.register_forward_pre_hook(
                    self._make_pre_hook(leaves, entry), with_kwargs=True
                )
            )
            self.handles.append(
                module.register_forward_hook(self._make_post_hook(leaves), with_kwargs=True)
            )

    # -- reading ----------------------------------------------------------------------------
    def _materialise(self, name: str) -> torch.Tensor:
        spec = self.tensors[name]
        data = spec.load()
        return data.to(device=self.execution_device, dtype=spec.dtype, non_blocking=True)

    def _read_entry(self, index: int) -> dict[str, torch.Tensor]:
        names = [n for n, e in self._entry_of.items() if e == index]
        return {n: self._materialise(n) for n in names}

    def _start_prefetch(self, index: int) -> None:
        if self._pool is None or index >= len(self._keys):
            return
        with self._lock:
            if index not in self._pending:
                self._pending[index] = self._pool.submit(self._read_entry, index)

    def _take(self, index: int, leaves: Mapping[str, str]) -> dict[str, torch.Tensor]:
        with self._lock:
            future = self._pending.get(index)
        if future is not None:
            ready = future.result()
            out = {leaf: ready.pop(name) for leaf, name in leaves.items() if name in ready}
            if not ready:
                with self._lock:
                    self._pending.pop(index, None)
            missing = {leaf: name for leaf, name in leaves.items() if leaf not in out}
        else:
            out, missing = {}, dict(leaves)
        out.update({leaf: self._materialise(name) for leaf, name in missing.items()})
        return out

    # -- hooks --------------------------------------------------------------------------------
    def _make_pre_hook(self, leaves: Mapping[str, str], index: int) -> Callable[..., Any]:
        def hook(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            tensors = self._take(index, leaves)
            self._start_prefetch(index + 1)
            for leaf, tensor in tensors.items():
                spec = self.tensors[leaves[leaf]]
                if spec.is_parameter:
                    mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=spec.requires_grad)
                else:
                    mod._buffers[leaf] = tensor
            return _to(args, self.execution_device), _to(kwargs, self.execution_device)

        return hook

    def _make_post_hook(self, leaves: Mapping[str, str]) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            for leaf, name in leaves.items():
                placeholder = _placeholder(mod, leaf)
                if self.tensors[name].is_parameter:
                    mod._parameters[leaf] = nn.Parameter(
                        placeholder, requires_grad=self.tensors[name].requires_grad
                    )
                else:
                    mod._buffers[leaf] = placeholder
            return output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _placeholder(module: nn.Module, leaf: str) -> torch.Tensor:
    current: torch.Tensor | None = module._parameters.get(leaf)
    if current is None:
        current = module._buffers[leaf]
    assert current is not None
    return torch.empty_like(current, device="meta")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def attach_offload_hooks(
    model: nn.Module,
    tensors: Mapping[str, OffloadedTensor],
    device_map: Mapping[str, str],
    *,
    execution_device: torch.device | str = "cpu",
    prefetch: bool = True,
) -> Offloader:
    """Replace every offloaded tensor by a ``meta`` placeholder and attach the hooks."""
    for name, spec in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = (
            module._parameters.get(leaf)
            if leaf in module._parameters
            else module._buffers.get(leaf)
        )
        assert current is not None, name
        meta = torch.empty(current.shape, dtype=spec.dtype, device="meta")
        if spec.is_parameter:
            module._parameters[leaf] = nn.Parameter(meta, requires_grad=spec.requires_grad)
        else:
            module._buffers[leaf] = meta
    offloader = Offloader(
        model,
        tensors,
        device_map,
        execution_device=torch.device(execution_device),
        prefetch=prefetch,
    )
    model._bigmodel_offloader = offloader  # type: ignore[assignment]  # keeps hooks and sources alive with the model
    return offloader


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, str | int],
    *,
    offload_folder: str | os.PathLike[str] | None = None,
    main_device: str | int | None = None,
    prefetch: bool = True,
) -> nn.Module:
    """Place an already-loaded model by ``device_map``: modules on an accelerator or ``cpu`` are
    moved there; modules on ``disk`` are written once into ``offload_folder`` (a temporary
    folder by default) and released, then brought back just for their forward. Outputs come
    back on ``main_device`` (default: the first accelerator in the map, else ``cpu``)."""
    resolved = {k: normalize_device(v) for k, v in device_map.items()}
    for key, device in resolved.items():
        if device != "disk":
            target = model.get_submodule(key) if key else model
            target.to(device)
    state = model.state_dict(keep_vars=True)
    disk = {name: tensor for name, tensor in state.items() if device_for(name, resolved) == "disk"}
    if main_device is None:
        accelerators = sorted(d for d in resolved.values() if d not in ("cpu", "disk"))
        main_device = accelerators[0] if accelerators else "cpu"
    if disk:
        specs = offload_state(disk, offload_folder)
        attach_offload_hooks(
            model,
            specs,
            resolved,
            execution_device=normalize_device(main_device),
            prefetch=prefetch,
        )
    return model
