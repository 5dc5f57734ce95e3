"""Running a model whose weights do not all fit: per-module hooks, offload, prefetch.

Offloaded modules keep ``meta`` placeholders. Just before such a module runs, a forward
pre-hook puts its real tensors in place on the execution device; right after, a forward hook
puts the placeholders back, so the weights are released. Two kinds of module are offloaded:

* ``disk`` modules: read from the original checkpoint shard when no conversion is needed (a
  view of the file mapping, so no private memory) or from ``offload_folder`` where converted
  copies were written once;
* ``cpu`` modules when the execution device is an accelerator: the CPU tensor is the source
  and is copied over for each forward (on CUDA through pinned memory on a side stream).

Tied names that are needed together are materialised once.

Prefetch: the device map's entries run in order; when entry *i* starts, the entries after it
are read in a background thread while the bytes they hold stay within the prefetch bound (by
default the largest entry, i.e. one entry ahead), so reads overlap compute and the memory in
flight is fixed. Entries that were skipped (a module whose forward did not run) are dropped.

The placement hooks (inputs to each entry's device, outputs back to the caller's) are
attached alongside, see :mod:`bigmodel.execution.hooks`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigmodel.execution.hooks import attach_placement_hooks, move_to
from bigmodel.execution.offload_sources import OffloadedTensor, resident_sources
from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.types import OffloadOptions
from bigmodel.placement.device_map import covering_key, device_for

__all__ = ["Offloader", "attach_offload_hooks"]


@dataclass
class _Batch:
    """Tensors of one entry on the execution device, and the copies they may still wait on."""

    tensors: dict[str, torch.Tensor]
    events: list[Any] = field(default_factory=list)  # torch.cuda.Event per async copy
    staging: list[torch.Tensor] = field(default_factory=list)  # pinned buffers kept alive

    def wait(self, device: torch.device) -> None:
        if not self.events:
            return
        stream = torch.cuda.current_stream(device)
        for event in self.events:
            stream.wait_event(event)
        for tensor in self.tensors.values():
            tensor.record_stream(stream)  # the allocator must not reuse it before the stream ran
        self.events.clear()
        self.staging.clear()


class Offloader:
    """Owns the offloaded tensors of one model and the hooks that bring them in and out.

    ``prefetch``: ``False`` reads each entry when it runs; ``True`` prefetches up to the size of
    the largest entry ahead; an int or a size string (``"512MB"``) sets that bound in bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, OffloadedTensor],
        device_map: Mapping[str, str],
        *,
        execution_device: torch.device,
        prefetch: bool | int | str = True,
    ) -> None:
        self.model = model
        self.tensors = dict(tensors)
        self.execution_device = execution_device
        self.handles: list[RemovableHandle] = []
        self._pending: dict[int, Future[_Batch]] = {}
        self._lock = threading.Lock()
        self._stream: Any = None
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
        self._names: list[list[str]] = [[] for _ in keys]
        for name, entry in self._entry_of.items():
            self._names[entry].append(name)
        self.entry_bytes = [self._unique_bytes(names) for names in self._names]
        self.prefetch_bytes = self._bound(prefetch)
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-prefetch")
            if self.prefetch_bytes
            else None
        )
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

    def _unique_bytes(self, names: list[str]) -> int:
        seen: dict[tuple[str, torch.dtype], int] = {}
        for name in names:
            spec = self.tensors[name]
            seen[(spec.source or name, spec.dtype)] = spec.nbytes
        return sum(seen.values())

    def _bound(self, prefetch: bool | int | str) -> int:
        bound = OffloadOptions(prefetch=prefetch).prefetch_bytes
        return max(self.entry_bytes, default=0) or 1 if bound is None else bound

    # -- reading ----------------------------------------------------------------------------
    def _read(self, names: list[str]) -> _Batch:
        """Materialise ``names`` on the execution device; tied names share one tensor."""
        batch = _Batch({})
        made: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        for name in names:
            spec = self.tensors[name]
            ident = (spec.source or name, spec.dtype)
            if ident not in made:
                made[ident] = self._copy(spec, batch)
            batch.tensors[name] = made[ident]
        return batch

    def _copy(self, spec: OffloadedTensor, batch: _Batch) -> torch.Tensor:
        data = spec.load()
        device = self.execution_device
        if device.type != "cuda":
            return data.to(device=device, dtype=spec.dtype)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        staged = data.to(dtype=spec.dtype).pin_memory()
        with torch.cuda.stream(self._stream):
            out = staged.to(device, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        batch.events.append(event)
        batch.staging.append(staged)
        return out

    def _schedule(self, running: int) -> None:
        """Drop batches of entries already passed; read ahead of ``running`` within the bound."""
        if self._pool is None:
            return
        with self._lock:
            for stale in [i for i in self._pending if i < running]:
                self._pending.pop(stale).cancel()
            # the running entry's tensors are the block that runs, not read-ahead
            inflight = sum(self.entry_bytes[i] for i in self._pending if i > running)
            nxt = running + 1
            while nxt < len(self._keys):
                if nxt not in self._pending:
                    if inflight + self.entry_bytes[nxt] > self.prefetch_bytes:
                        break
                    self._pending[nxt] = self._pool.submit(self._read, self._names[nxt])
                    inflight += self.entry_bytes[nxt]
                nxt += 1

    def _take(self, index: int, leaves: Mapping[str, str]) -> dict[str, torch.Tensor]:
        with self._lock:
            future = self._pending.get(index)
        out: dict[str, torch.Tensor] = {}
        if future is not None:
            batch = future.result()
            batch.wait(self.execution_device)
            for leaf, name in leaves.items():
                if name in batch.tensors:
                    out[leaf] = batch.tensors.pop(name)
            if not batch.tensors:  # every module of the entry has taken its tensors
                with self._lock:
                    if self._pending.get(index) is future:
                        del self._pending[index]
        missing = [name for leaf, name in leaves.items() if leaf not in out]
        if missing:
            batch = self._read(missing)
            batch.wait(self.execution_device)
            by_name = {name: leaf for leaf, name in leaves.items()}
            out.update({by_name[n]: t for n, t in batch.tensors.items()})
        return out

    # -- hooks --------------------------------------------------------------------------------
    def _make_pre_hook(self, leaves: Mapping[str, str], index: int) -> Callable[..., Any]:
        def hook(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            tensors = self._take(index, leaves)
            self._schedule(index)
            for leaf, tensor in tensors.items():
                spec = self.tensors[leaves[leaf]]
                if spec.is_parameter:
                    mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=spec.requires_grad)
                else:
                    mod._buffers[leaf] = tensor
            return move_to(args, self.execution_device), move_to(kwargs, self.execution_device)

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

    def in_flight(self) -> list[str]:
        """Device-map entries whose tensors are read ahead and not yet taken (for tests, logs)."""
        with self._lock:
            return [self._keys[i] for i in sorted(self._pending)]

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


def attach_offload_hooks(
    model: nn.Module,
    tensors: Mapping[str, OffloadedTensor],
    device_map: Mapping[str, str],
    *,
    execution_device: torch.device | str = "cpu",
    prefetch: bool | int | str = True,
) -> Offloader | None:
    """Hook up a placed model: offload ``tensors`` (disk) — and, when the execution device is an
    accelerator, the ``cpu`` modules too — and attach the placement hooks.

    Offloaded tensors are replaced by ``meta`` placeholders. Returns the :class:`Offloader`
    (also kept on the model), or ``None`` when nothing is offloaded.
    """
    execution = torch.device(normalize_device(execution_device))
    specs = dict(tensors)
    if execution.type != "cpu":
        state = model.state_dict(keep_vars=True)
        specs.update(
            resident_sources(
                {
                    n: t
                    for n, t in state.items()
                    if n not in specs and device_for(n, device_map) == "cpu"
                }
            )
        )
    for name, spec in specs.items():
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
    offloader = (
        Offloader(model, specs, device_map, execution_device=execution, prefetch=prefetch)
        if specs
        else None
    )
    handles = attach_placement_hooks(model, device_map, execution)
    # keeps hooks and sources alive with the model
    model._bigmodel_offloader = offloader  # type: ignore[assignment]
    model._bigmodel_placement_hooks = handles  # type: ignore[assignment]
    return offloader
