"""Running a model whose weights do not all fit: materialisation units, offload, prefetch.

Offloaded tensors keep ``meta`` placeholders and are materialised on the execution device by
*unit*, for the duration of one module's forward (the unit's *scope*), then released. Two
kinds of tensor are offloaded (see :mod:`bigmodel.execution.residency`):

* those of ``disk`` entries: read from the original checkpoint shard when no conversion is
  needed (a view of the file mapping, brought into memory ahead of use by the prefetch
  thread, :func:`bigmodel.storage.readahead.prefault`) or from ``offload_folder`` where
  converted copies were written once;
* those of ``cpu`` entries when the execution device is an accelerator: the CPU tensor is the
  source and is copied over for each forward (on CUDA through pinned memory on a side stream).

**The materialisation rule.** Every offloaded tensor belongs to exactly one unit, named by its
scope:

1. a tensor inside a *block* — an instance of a class of repeated blocks (the planner's atoms,
   :func:`bigmodel.placement.planner.repeated_block_classes`, or ``block_classes`` when
   given) — belongs to the outermost block holding it: the block's forward is its scope,
   whether the block lies inside the tensor's device-map entry (``{"": "disk"}``,
   ``{"backbone.layers": "disk"}`` are materialised one block at a time) or the entry lies
   inside the block (the block's forward then holds only that entry's tensors);
2. any other tensor belongs to its device-map entry: the scope is the entry's module — or,
   when that module has no forward of its own (``ModuleList``, ``ModuleDict``), the first
   module with a forward on the way down to the tensor, and when there is none on that way
   (a ``ParameterList``) the nearest ancestor with a forward; for an entry that names a
   tensor, its module. So with ``{"": "disk"}`` the embedding, final norm and head are
   materialised for the whole forward of the root, and each block for its own forward;
3. the tensors of one scope (from any entries) form one unit, materialised together.

Hence a module that reads a child's weight without calling the child (Mamba's mixer reads
``dt_proj.weight``; a head computing ``hidden @ self.embed.weight.T``) finds it in place as
long as both are in one unit. Outside its unit's forward an offloaded tensor is a
placeholder that refuses to compute (:mod:`bigmodel.execution.placeholders`): using it —
a submodule called directly (``model.layers[3].attn(x)`` while ``layers.3`` is a unit), a
module reading the weight of another unit that it neither calls nor contains
(``self.embed.weight`` read by the root when ``embed`` is its own ``disk`` entry and the root
is not) — raises :class:`~bigmodel.foundations.errors.MetaTensorError` naming the tensor and
its unit, never uninitialised numbers. The fix: call the unit's module, or keep such modules
in one entry, or in one block (``block_classes``, from ``no_split_module_classes``).

Units nest (the root's unit holds while each block's unit comes and goes) and are counted:
a unit entered again while materialised (a module called twice within one forward, a
recursive module) is neither read nor released twice; tied names of one unit share one
tensor (and one ``Parameter``), read once.

**Prefetch.** Units run in the order of the last complete forward (at first, the order of
their scopes in the module tree). When a unit is entered, the units that follow it are read in
a background thread while the bytes read ahead stay within the prefetch bound (by default the
largest unit, i.e. one unit ahead), so reads overlap compute with a fixed amount of memory in
flight; read-ahead units that are no longer next (their module was skipped) are dropped.
When a forward starts, its first units are read while the modules before them (resident ones)
compute. ``peak_bytes`` records the most bytes materialised at once (units held plus read
ahead).

**Larger than memory.** Whether the units can stay in the page cache is decided once, when the
hooks are attached (``streaming``): the bytes they hold plus the read-ahead bound against the
room the page cache has (:func:`bigmodel.storage.page_cache.page_cache_room`: ``MemAvailable``
and the memory cgroup's limit). When they can, a unit's file pages stay mapped after it ran,
and a warm forward reads nothing. When they cannot, every forward reads every unit from the
file again, so (1) the pages of a unit that ran are unmapped at once
(:func:`bigmodel.storage.readahead.drop_pages`; they stay clean page cache, which the kernel
reclaims far more cheaply than pages still mapped: the reads of the next units get the memory
sooner) — only views of a file, never private memory — and (2) the window is cyclic: during
the last units of a forward, the first units of the next one are read (a generation loop
calls forward again at once), so the disk does not idle between forwards.

The placement hooks (inputs to each entry's device, outputs back to the caller's) are
attached alongside, see :mod:`bigmodel.execution.hooks`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigmodel.execution.hooks import attach_placement_hooks, has_forward
from bigmodel.execution.offload_sources import OffloadedTensor, keep_resident, resident_sources
from bigmodel.execution.placeholders import make_placeholder
from bigmodel.execution.residency import tensor_roles
from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.types import OffloadOptions
from bigmodel.placement.device_map import covering_key
from bigmodel.placement.planner import repeated_block_classes
from bigmodel.storage.page_cache import page_cache_room
from bigmodel.storage.readahead import FileMappings, drop_pages, prefault

__all__ = ["Offloader", "attach_offload_hooks", "unit_scopes"]

BlockClasses = Iterable[type[nn.Module] | str]


@dataclass
class _Batch:
    """Tensors of one unit on the execution device, and the copies they may still wait on."""

    tensors: dict[str, torch.Tensor]
    events: list[Any] = field(default_factory=list)  # torch.cuda.Event per async copy
    staging: list[torch.Tensor] = field(default_factory=list)  # pinned buffers kept alive
    mapped: list[torch.Tensor] = field(default_factory=list)  # file views to drop after use

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


@dataclass
class _Slot:
    """Where one offloaded name lives in the model, and the placeholder it returns to."""

    name: str
    module: nn.Module
    leaf: str
    is_parameter: bool
    requires_grad: bool
    placeholder: torch.Tensor


@dataclass
class _Unit:
    """Offloaded names materialised together for the forward of the module ``scope``."""

    scope: str
    names: list[str]
    nbytes: int


# -- the materialisation rule ---------------------------------------------------------------------


def unit_scopes(
    model: nn.Module,
    names: Iterable[str],
    device_map: Mapping[str, str],
    block_classes: BlockClasses | None = None,
) -> dict[str, str]:
    """``{tensor name: scope module name}`` by the rule of the module docstring."""
    classes = repeated_block_classes(model) if block_classes is None else set(block_classes)
    kinds = {c if isinstance(c, str) else c.__name__ for c in classes}
    modules = dict(model.named_modules(remove_duplicate=False))
    blocks = {n for n, m in modules.items() if type(m).__name__ in kinds}
    scopes: dict[str, str] = {}
    for name in names:
        owner = name.rpartition(".")[0]
        parts = owner.split(".") if owner else []
        path = [".".join(parts[:i]) for i in range(len(parts) + 1)]  # root ... owner
        block = next((p for p in path if p in blocks), None)
        if block is not None:
            scopes[name] = block
            continue
        key = covering_key(name, device_map)
        if key is None:
            raise ValueError(
                f"The device map places no entry over {name!r}; add it (or an ancestor, or '') "
                "to device_map."
            )
        start = path.index(key if key in modules else owner)
        down = (p for p in path[start:] if has_forward(modules[p]))
        up = (p for p in reversed(path[:start]) if has_forward(modules[p]))
        scopes[name] = next(down, next(up, ""))
    return scopes


def _units(
    model: nn.Module, tensors: Mapping[str, OffloadedTensor], scopes: Mapping[str, str]
) -> list[_Unit]:
    """Units in the order of their scopes in the module tree (parents before children)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    by_scope: dict[str, list[str]] = {}
    for name, scope in scopes.items():
        by_scope.setdefault(scope, []).append(name)
    units = []
    for scope in sorted(by_scope, key=lambda s: order.get(s, len(order))):
        seen: dict[tuple[str, torch.dtype], int] = {}
        for name in by_scope[scope]:
            spec = tensors[name]
            seen[(spec.source or name, spec.dtype)] = spec.nbytes
        units.append(_Unit(scope, by_scope[scope], sum(seen.values())))
    return units


def _slot(model: nn.Module, name: str, spec: OffloadedTensor, scope: str) -> _Slot:
    """The slot of ``name``, its ``meta`` stand-in replaced by a placeholder that refuses to
    compute outside the unit's forward (:mod:`bigmodel.execution.placeholders`)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(leaf) if spec.is_parameter else module._buffers.get(leaf)
    assert current is not None, name
    placeholder = make_placeholder(
        current, name, scope, is_parameter=spec.is_parameter, grad=spec.requires_grad
    )
    if spec.is_parameter:
        module._parameters[leaf] = placeholder  # type: ignore[assignment]
    else:
        module._buffers[leaf] = placeholder
    return _Slot(name, module, leaf, spec.is_parameter, spec.requires_grad, placeholder)


class Offloader:
    """Owns the offloaded tensors of one model and the hooks that bring them in and out.

    ``prefetch``: ``False`` reads each unit when it runs; ``True`` prefetches up to the size of
    the largest unit ahead; an int or a size string (``"512MB"``) sets that bound in bytes.
    ``block_classes``: the classes of blocks (default: the repeated ones, as the planner).
    ``streaming`` (read once, here) says whether the units are larger than the page cache may
    hold: then a unit's file pages are unmapped after it ran and prefetch reads across forwards
    (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, OffloadedTensor],
        device_map: Mapping[str, str],
        *,
        execution_device: torch.device,
        prefetch: bool | int | str = True,
        block_classes: BlockClasses | None = None,
    ) -> None:
        self.model = model
        self.tensors = dict(tensors)
        self.execution_device = execution_device
        self.handles: list[RemovableHandle] = []
        self._stream: Any = None
        self._lock = threading.Lock()
        scopes = unit_scopes(model, self.tensors, device_map, block_classes)
        self.units = _units(model, self.tensors, scopes)
        self._slots = [
            [_slot(model, n, self.tensors[n], u.scope) for n in u.names] for u in self.units
        ]
        self.entry_bytes = [unit.nbytes for unit in self.units]  # per unit, in unit order
        self.prefetch_bytes = self._bound(prefetch)
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-prefetch")
            if self.prefetch_bytes
            else None
        )
        self._pending: dict[int, Future[_Batch]] = {}
        self.streaming = self._streams_from_disk()
        self._mappings: FileMappings | None = None
        self._views: dict[int, list[torch.Tensor]] = {}  # per unit held: file pages to drop
        self._count = [0] * len(self.units)
        self._set_order(list(range(len(self.units))))
        self._cursor = -1
        self._depth = 0
        self._trace: list[int] = []
        self.resident_bytes = 0
        self.peak_bytes = 0
        self._attach()

    def _bound(self, prefetch: bool | int | str) -> int:
        bound = OffloadOptions(prefetch=prefetch).prefetch_bytes
        return max(self.entry_bytes, default=0) or 1 if bound is None else bound

    def _streams_from_disk(self) -> bool:
        """Whether the units cannot all stay in the page cache (decided once, here): what
        streams per forward, plus the read-ahead, is more than the page cache this process may
        fill (:func:`~bigmodel.storage.page_cache.page_cache_room`: ``MemAvailable``, memory
        cgroup limits). Then every forward reads the units from the file again, so the pages of
        a unit that ran are given back at once and prefetch reads across forwards; otherwise
        the pages stay mapped, and a warm forward reads nothing."""
        room = page_cache_room()
        return room is not None and sum(self.entry_bytes) + self.prefetch_bytes > room

    def _attach(self) -> None:
        root = self.model
        self.handles.append(root.register_forward_pre_hook(self._pass_start, prepend=True))
        for index, unit in enumerate(self.units):
            module = root.get_submodule(unit.scope)
            self.handles.append(module.register_forward_pre_hook(self._enter_hook(index)))
            self.handles.append(
                module.register_forward_hook(self._exit_hook(index), always_call=True)
            )
        self.handles.append(root.register_forward_hook(self._pass_end, always_call=True))

    # -- execution order ----------------------------------------------------------------------
    def _set_order(self, order: list[int]) -> None:
        self._order = order
        self._positions: dict[int, list[int]] = {}
        for position, unit in enumerate(order):
            self._positions.setdefault(unit, []).append(position)

    def _pass_start(self, mod: nn.Module, args: tuple[Any, ...]) -> None:
        if self._depth == 0:
            self._trace, self._cursor = [], -1
            self._schedule()  # the first units read while what is resident computes
        self._depth += 1

    def _pass_end(self, mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._trace:
            if self._trace != self._order:  # learn the order units really run in
                self._set_order(self._trace)
            self._trace = []

    def _advance(self, unit: int) -> None:
        """Move the cursor to this unit's next place in the order (recording the pass)."""
        if self._depth:
            self._trace.append(unit)
        positions = self._positions.get(unit)
        if positions:
            at = bisect.bisect_right(positions, self._cursor)
            self._cursor = positions[at] if at < len(positions) else positions[0]

    # -- reading ------------------------------------------------------------------------------
    def _read(self, unit: int) -> _Batch:
        """Materialise the unit's names on the execution device; tied names share one tensor."""
        batch = _Batch({})
        made: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        mapped: list[torch.Tensor] = []
        for name in self.units[unit].names:
            spec = self.tensors[name]
            ident = (spec.source or name, spec.dtype)
            if ident not in made:
                made[ident] = self._copy(spec, batch, mapped)
            batch.tensors[name] = made[ident]
        if mapped:
            prefault(mapped)  # views of a file: read them now, not page by page in compute
            if self.streaming:
                batch.mapped = self._file_views(mapped)
        return batch

    def _file_views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Those of ``tensors`` that are views of a file mapping (private memory must never be
        dropped: it would read back as zeros). The map of mappings is re-read on a miss."""
        mappings = self._mappings
        if mappings is None or not all(mappings.holds(t) for t in tensors):
            mappings = self._mappings = FileMappings()
        return [t for t in tensors if mappings.holds(t)]

    def _copy(
        self, spec: OffloadedTensor, batch: _Batch, mapped: list[torch.Tensor]
    ) -> torch.Tensor:
        """``spec``'s tensor on the execution device; a CPU tensor that is still the source's
        memory (no conversion: usually a view of a file) is added to ``mapped``."""
        data = spec.load()
        device = self.execution_device
        if device.type != "cuda":
            out = data.to(device=device, dtype=spec.dtype)
            if out.device.type == "cpu" and out.data_ptr() == data.data_ptr():
                mapped.append(out)
            return out
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        staged = data.to(dtype=spec.dtype)
        staged = staged if staged.is_pinned() else staged.pin_memory()
        with torch.cuda.stream(self._stream):
            out = staged.to(device, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        batch.events.append(event)
        batch.staging.append(staged)
        return out

    def _charge(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def _window(self) -> list[int]:
        """The units after the cursor to hold read ahead: as many as the bound allows."""
        window: list[int] = []
        total = 0
        following = self._order[self._cursor + 1 :]
        if self.streaming:  # the next forward follows: read its first units at this one's end
            following += self._order[: max(self._cursor, 0)]
        for unit in following:
            if unit in window or self._count[unit]:
                continue
            if total + self.entry_bytes[unit] > self.prefetch_bytes:
                break
            window.append(unit)
            total += self.entry_bytes[unit]
        return window

    def _schedule(self) -> None:
        """Drop read-ahead units that are no longer next; read ahead within the bound."""
        if self._pool is None:
            return
        window = self._window()
        with self._lock:
            stale = [u for u in self._pending if u not in window]
            dropped = [self._pending.pop(u) for u in stale]
        for unit, future in zip(stale, dropped, strict=True):
            future.cancel()
            self._charge(-self.entry_bytes[unit])
        for unit in window:
            if unit not in self._pending:
                self._charge(self.entry_bytes[unit])
                with self._lock:
                    self._pending[unit] = self._pool.submit(self._read, unit)

    def _take(self, unit: int) -> _Batch:
        with self._lock:
            future = self._pending.pop(unit, None)
        if future is None:
            self._charge(self.entry_bytes[unit])
            batch = self._read(unit)
        else:
            batch = future.result()
        batch.wait(self.execution_device)
        return batch

    # -- hooks --------------------------------------------------------------------------------
    def _enter(self, unit: int) -> None:
        if self._count[unit]:  # already materialised: a nested or repeated call
            self._count[unit] += 1
            return
        self._advance(unit)
        batch = self._take(unit)
        made: dict[int, nn.Parameter] = {}
        for slot in self._slots[unit]:
            tensor = batch.tensors[slot.name]
            if slot.is_parameter:
                param = made.get(id(tensor))
                if param is None:
                    param = made[id(tensor)] = nn.Parameter(tensor, slot.requires_grad)
                slot.module._parameters[slot.leaf] = param
            else:
                slot.module._buffers[slot.leaf] = tensor
        if batch.mapped:
            self._views[unit] = batch.mapped
        self._count[unit] = 1
        self._schedule()

    def _exit(self, unit: int) -> None:
        if self._count[unit] == 0:  # the pre-hook failed before materialising
            return
        self._count[unit] -= 1
        if self._count[unit]:
            return
        for slot in self._slots[unit]:
            if slot.is_parameter:
                slot.module._parameters[slot.leaf] = slot.placeholder  # type: ignore[assignment]
            else:
                slot.module._buffers[slot.leaf] = slot.placeholder
        self._charge(-self.entry_bytes[unit])
        views = self._views.pop(unit, None)
        if views:
            drop_pages(views)  # streaming: the kernel reclaims unmapped pages far faster
        if self.streaming:
            self._schedule()  # the window moved on: e.g. a unit held for the whole forward

    def _enter_hook(self, unit: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            self._enter(unit)

        return hook

    def _exit_hook(self, unit: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._exit(unit)

        return hook

    def in_flight(self) -> list[str]:
        """Scopes of the units read ahead and not yet taken (for tests, logs)."""
        with self._lock:
            return [self.units[i].scope for i in sorted(self._pending)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _offloaded_state(
    model: nn.Module,
    tensors: Mapping[str, OffloadedTensor],
    device_map: Mapping[str, str],
    execution: torch.device,
) -> dict[str, OffloadedTensor]:
    """Every tensor to stream (disk sources, and CPU ones for an accelerator); tensors that
    must reach the execution device without a source (non-persistent buffers) are moved."""
    everything = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    persistent: Collection[str] = (
        model.state_dict(keep_vars=True).keys() if execution.type != "cpu" else ()
    )
    roles = tensor_roles(
        everything,
        device_map,
        normalize_device(execution),
        offloaded=tensors.keys(),
        persistent=persistent,
    )
    specs = dict(tensors)
    specs.update(
        resident_sources(
            {n: everything[n] for n, r in roles.items() if r == "stream" and n not in specs}
        )
    )
    moved: dict[int, torch.Tensor] = {}
    for name in (n for n, r in roles.items() if r == "move"):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = everything[name]
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.to(execution)
        if leaf in module._buffers:
            module._buffers[leaf] = moved[id(tensor)]
        else:
            module._parameters[leaf] = nn.Parameter(moved[id(tensor)], tensor.requires_grad)
    return specs


def _offloaded_slots(
    model: nn.Module, specs: Mapping[str, OffloadedTensor]
) -> list[tuple[nn.Module, str, torch.Tensor, OffloadedTensor]]:
    """Each spec's module, leaf name and current tensor; refuses a spec whose kind (parameter or
    buffer) is not the model's, before anything is changed."""
    slots = []
    for name, spec in specs.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        is_parameter = leaf in module._parameters
        current = module._parameters.get(leaf) if is_parameter else module._buffers.get(leaf)
        if current is None or is_parameter != spec.is_parameter:
            kind = (
                "no tensor" if current is None else ("a parameter" if is_parameter else "a buffer")
            )
            raise ValueError(
                f"Cannot offload {name!r}: the model has {kind} there, but the offload source "
                f"describes {'a parameter' if spec.is_parameter else 'a buffer'}. Fix: build the "
                "sources from this model's own state (offload_sources / offload_state)."
            )
        slots.append((module, leaf, current, spec))
    return slots


def _to_placeholders(model: nn.Module, specs: Mapping[str, OffloadedTensor]) -> None:
    for module, leaf, current, spec in _offloaded_slots(model, specs):
        meta = torch.empty(current.shape, dtype=spec.dtype, device="meta")
        if spec.is_parameter:
            module._parameters[leaf] = nn.Parameter(meta, requires_grad=spec.requires_grad)
        else:
            module._buffers[leaf] = meta


def attach_offload_hooks(
    model: nn.Module,
    tensors: Mapping[str, OffloadedTensor],
    device_map: Mapping[str, str],
    *,
    execution_device: torch.device | str = "cpu",
    prefetch: bool | int | str = True,
    block_classes: BlockClasses | None = None,
) -> Offloader | None:
    """Hook up a placed model: offload ``tensors`` (disk) — and, when the execution device is an
    accelerator, the ``cpu`` entries too — and attach the placement hooks.

    When the map sends something to disk, ``cpu`` tensors that are views of a file get private
    memory first (:func:`~bigmodel.execution.offload_sources.keep_resident`). Offloaded tensors
    are replaced by ``meta`` placeholders; non-persistent buffers of ``cpu``/``disk`` entries
    are moved to an accelerator execution device once (:mod:`bigmodel.execution.residency`).
    Returns the :class:`Offloader` (also kept on the model), or ``None`` when nothing is
    offloaded.
    """
    execution = torch.device(normalize_device(execution_device))
    keep_resident(model, device_map)
    specs = _offloaded_state(model, tensors, device_map, execution)
    _to_placeholders(model, specs)
    offloader = (
        Offloader(
            model,
            specs,
            device_map,
            execution_device=execution,
            prefetch=prefetch,
            block_classes=block_classes,
        )
        if specs
        else None
    )
    handles = attach_placement_hooks(model, device_map, execution)
    # keeps hooks and sources alive with the model
    model._bigmodel_offloader = offloader  # type: ignore[assignment]
    model._bigmodel_placement_hooks = handles  # type: ignore[assignment]
    return offloader
