"""Reading a load's planned tensors and putting each in place, one process or many.

A :class:`PlanReader` holds what every path shares (the module, the open checkpoint, the
module's tensors by name, the :class:`~bigmodel.placement.policy.Placement`, the report and
the progress bar); :meth:`PlanReader.read` sends each planned tensor down one of three paths
(the last two are in :mod:`bigmodel.execution.distributed_reading`):

* local (one process, or a strategy where every rank maps the files): ``io="mmap"`` views of
  the mapping, made resident before the load returns (see :func:`start_mapped_read`), or
  ``io="pread"`` parallel reads bounded by bytes in flight (see :mod:`bigmodel.storage.pread`);
* sharded (a DTensor target): only the slice this rank's placement owns is read;
* replicated under a process group: ``mmap``, ``shm``, ``scatter`` or ``rank0`` (see
  :mod:`bigmodel.execution.distributed`).

Tensors go from the file to their final dtype and device in one step; at most one converted
tensor is in flight beyond the final model (``io="pread"``: the in-flight bound). A converting
CPU load (the stored dtype differs from the target's) with pages to read from the disk casts
into outputs a background thread allocated ahead with their pages already mapped (:class:`~bigmodel.storage.allocate_ahead.
AllocateAhead`, within ``io.inflight_bytes``), so that the page faults of the fresh memory
overlap the disk instead of adding to the cast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.execution.distributed import (
    Group,
    local_shard,
    mesh_device,
    run_step,
)
from bigmodel.execution.distributed_reading import read_replicated, read_sharded
from bigmodel.execution.offload_sources import OffloadedTensor, offload_built, offload_folder_path
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import IOOptions, LoadReport
from bigmodel.placement.conversions import DerivedGroup
from bigmodel.placement.load_plan import Plan, tie_groups
from bigmodel.placement.policy import Placement, like, place
from bigmodel.storage.allocate_ahead import AllocateAhead
from bigmodel.storage.page_cache import looks_cached, page_cache_room, resident_bytes
from bigmodel.storage.pread import mapped_read_shape, pick_io, pread_tensors
from bigmodel.storage.readahead import Populator, needs_announcing
from bigmodel.storage.remote_read import remote_tensors

__all__ = ["MappedRead", "PlanReader", "start_early_read", "start_mapped_read"]

#: Whether converting CPU loads cast into outputs allocated ahead (see the module docstring);
#: a switch for measuring the difference (benchmarks/bench_load.py), not an option.
ALLOCATE_AHEAD = True


@dataclass
class PlanReader:
    """One load's reading: see the module docstring for the paths a tensor can take."""

    model: nn.Module
    ckpt: Checkpoint
    targets: dict[str, torch.Tensor]
    placement: Placement
    report: LoadReport
    #: Replace tensors (load_checkpoint); False copies into materialised ones (HF semantics).
    assign: bool = True
    io: IOOptions = field(default_factory=IOOptions)
    strategy: str = "auto"
    progress: bool | None = None
    bar: Any = None
    #: The background read of a mapped load (None for other paths), possibly started before
    #: the plan was made (:func:`start_mapped_read`).
    mapped: MappedRead | None = None
    #: The outputs of a converting single-process load, allocated ahead (None otherwise).
    ahead: AllocateAhead | None = None

    def read(self, plan: Plan, group: Group | None = None) -> None:
        """Read each planned tensor in file order and put it in place.

        Offloaded tensors are skipped (their hooks read them); DTensor targets get only this
        rank's slice; under a process group, replicated tensors follow ``strategy``.
        """
        todo = [(k, g) for k, g in plan if not self.placement.offloaded(g[0])]
        sharded = [(k, g) for k, g in todo if is_dtensor(self.targets[g[0]])]
        replicated = [(k, g) for k, g in todo if not is_dtensor(self.targets[g[0]])]
        total = sum(self.ckpt.tensor_info(k).nbytes for k, _ in todo)
        with progress_bar(
            total=total, desc=f"Loading {self.ckpt.location.name}", progress=self.progress
        ) as self.bar:
            if sharded:
                run_step(
                    group,
                    f"reading this rank's shards of {self.ckpt.path}",
                    lambda: read_sharded(self, sharded),
                )
            if group is None:
                try:
                    fetch = self._fetcher(replicated)
                    self.ahead = self._allocate_ahead(replicated)
                    with _cast_threads(busy=2 if self.ahead is not None else 0):
                        self.read_local(fetch, replicated)
                    if self.mapped is not None:
                        self.mapped.settle()  # every page resident before the load returns
                finally:
                    if self.ahead is not None:
                        self.ahead.cancel()  # a failed load frees what was allocated ahead
                        self.ahead = None
                    if self.mapped is not None:
                        self.mapped.cancel()
            elif replicated:
                read_replicated(self, replicated, group)

    def _fetcher(self, items: Plan) -> Callable[[str], torch.Tensor]:
        """How the single-process path gets each stored tensor, by ``io``.

        mmap: views of the mapping, read in the background at the disk's rate and handed out
        once resident (see :func:`start_mapped_read`). pread: parallel reads scheduled by bytes in
        flight (see ``bigmodel.storage.pread``). A remote checkpoint: concurrent range
        requests under the same bound (see ``bigmodel.storage.remote_read``).
        """
        ckpt = self.ckpt
        stream: Iterator[tuple[str, torch.Tensor]]
        if ckpt.remote is not None:
            stream = remote_tensors(
                ckpt.remote,
                [ckpt.remote_range(key) for key, _ in items],
                max_inflight_bytes=self.io.inflight,
                # cast part by part as the bytes arrive: no whole tensor in its stored dtype
                dtypes=[self.placement.dtype_for(g[0], self.targets[g[0]]) for _, g in items],
            )
            return _in_order(stream)
        ranges = [ckpt.byte_range(key) for key, _ in items]
        io = pick_io(self.io.mode, ckpt.directory) if ranges and all(ranges) else "mmap"
        if io == "mmap":
            if self.mapped is None:
                self.mapped = start_mapped_read(ckpt, [key for key, _ in items], self.io)
            planned = sum(r.nbytes for r in ranges if r is not None)
            self.report.cached_bytes += min(self.mapped.cached, planned)  # an early read
            return self.mapped.fetch  # also covered the tensors the plan leaves out
        stream = pread_tensors(
            [r for r in ranges if r is not None], max_inflight_bytes=self.io.inflight
        )
        return _in_order(stream)

    def _allocate_ahead(self, items: Plan) -> AllocateAhead | None:
        """Start allocating the outputs of the converting CPU tensors among ``items``, for a
        mapped read with bytes to read from the disk (None otherwise).

        Only then is there a wait to hide the page faults behind: warm, the cast is the whole
        load and torch's threads fault the fresh pages as fast (measured on 2 cores: a warm
        fp32 -> bf16 load took 0.63 s with outputs allocated ahead, 0.58 s without)."""
        if not ALLOCATE_AHEAD or self.mapped is None or self.mapped.populator is None:
            return None
        specs = [self._output_spec(key, group[0]) for key, group in items]
        if not any(specs):
            return None
        return AllocateAhead(specs, ahead_bytes=self.io.inflight)

    def _output_spec(self, key: str, name: str) -> tuple[torch.Size, torch.dtype] | None:
        """(shape, dtype) of the new CPU tensor that ``key`` is cast into; None when it is
        placed otherwise (same dtype: a view; another device; copied into ``name``'s tensor)."""
        old = self.targets[name]
        if not (self.assign or old.is_meta) or is_dtensor(old):
            return None
        info = self.ckpt.tensor_info(key)
        dtype = self.placement.dtype_for(name, old)
        if dtype == info.dtype or self.placement.device_for(name, old).type != "cpu":
            return None
        return torch.Size(info.shape), dtype

    def _converted(
        self,
        n: int,
        data: torch.Tensor,
        old: torch.Tensor,
        name: str,
        resident: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """``data`` on its target's device in its target's dtype: cast into output ``n``
        allocated ahead when there is one, else by ``Tensor.to``. ``resident(nbytes)``, when
        given, blocks until the first ``nbytes`` of ``data`` are resident: the cast then runs
        piece by piece behind the read (see :func:`_cast_in_pieces`)."""
        out = self.ahead.take(n) if self.ahead is not None else None
        if out is None or out.shape != data.shape:
            if resident is not None:
                resident(data.nbytes)
            device = self.placement.device_for(name, old)
            return data.to(device=device, dtype=self.placement.dtype_for(name, old))
        with torch.no_grad():
            if resident is not None:
                return _cast_in_pieces(out, data, resident)
            return out.copy_(data)

    def read_local(
        self,
        fetch: Callable[[str], torch.Tensor],
        items: Plan,
        *,
        counts: Callable[[str], bool] = lambda key: True,
    ) -> None:
        """``fetch(key)`` gives the stored tensor (usually a file view); ``counts(key)`` says
        whether this process read its bytes (for ``LoadReport.bytes_read``)."""
        for n, (key, group) in enumerate(items):
            old = self.targets[group[0]]
            converting = self.ahead is not None and (self.assign or old.is_meta)
            streamed = self.mapped.streamed(key) if converting and self.mapped else None
            data, resident = streamed if streamed is not None else (fetch(key), None)
            if self.assign or old.is_meta:
                converted = self._converted(n, data, old, group[0], resident)
                place(self.model, group, old, converted)
            else:
                with torch.no_grad():
                    old.copy_(data)
            del data
            nbytes = self.ckpt.tensor_info(key).nbytes
            if counts(key):
                self.report.bytes_read += nbytes
            self.report.loaded_keys.append(key)
            self.bar.update(nbytes)


@dataclass
class MappedRead:
    """A mapped read under way: views of the planned tensors, made resident in order by a
    :class:`~bigmodel.storage.readahead.Populator`, handed out by :meth:`fetch` once resident.
    ``cached`` is how many of their bytes were in the page cache when it started."""

    ckpt: Checkpoint
    views: dict[str, torch.Tensor]
    #: None for a warm read: every page is cached already, views fault them in as used.
    populator: Populator | None
    cached: int
    #: Whether the load waits for every page (not when they cannot all stay cached).
    fits: bool

    def fetch(self, key: str) -> torch.Tensor:
        """The view of ``key`` once its pages are resident (any other key: a plain view)."""
        if key not in self.views:
            return self.ckpt.get_tensor(key, readahead=False)
        if self.populator is not None:
            self.populator.wait(self.position[key])
        return self.views.pop(key)

    def streamed(self, key: str) -> tuple[torch.Tensor, Callable[[int], None]] | None:
        """For a large tensor still being read: its view at once, and a function that blocks
        until the first ``nbytes`` of it are resident, so that a cast can follow the read
        piece by piece (None otherwise: use :meth:`fetch`)."""
        view = self.views.get(key)
        if self.populator is None or view is None or view.nbytes < STREAM_BYTES:
            return None
        del self.views[key]
        populator, i = self.populator, self.position[key]
        return view, lambda nbytes: populator.wait_prefix(i, nbytes)

    def __post_init__(self) -> None:
        self.position = {key: i for i, key in enumerate(self.views)}

    def settle(self) -> None:
        """Wait until every page is resident (when they fit in the page cache)."""
        if self.fits and self.populator is not None:
            self.populator.join()

    def cancel(self) -> None:
        """Stop the background read (done, or the load failed)."""
        if self.populator is not None:
            self.populator.cancel()


#: Tensors at least this large are cast piece by piece as their pages come in (a cold
#: converting load), and the pieces are this large: the cast of the last tensor then no
#: longer waits for all of it to be read, nor the first cast for all of the first tensor.
STREAM_BYTES = 16 * 2**20


def _cast_in_pieces(
    out: torch.Tensor, data: torch.Tensor, resident: Callable[[int], None]
) -> torch.Tensor:
    """``out.copy_(data)`` in pieces of about :data:`STREAM_BYTES` of ``data``, each once
    ``resident`` says its bytes are in (both contiguous, same shape)."""
    if not (data.is_contiguous() and out.is_contiguous()):
        resident(data.nbytes)
        return out.copy_(data)
    src, dst = data.reshape(-1), out.view(-1)
    step = max(1, STREAM_BYTES // data.element_size())
    for begin in range(0, src.numel(), step):
        end = min(src.numel(), begin + step)
        resident(end * data.element_size())
        dst[begin:end].copy_(src[begin:end])
    return out


def start_mapped_read(ckpt: Checkpoint, keys: list[str], io: IOOptions) -> MappedRead:
    """Start reading ``keys`` (in this order) through the mapping, in the background.

    A :class:`~bigmodel.storage.readahead.Populator` maps every tensor in order
    (``MADV_POPULATE_READ``): a cast or device copy of tensor ``i`` runs on resident pages
    while the tensors after it are read, and the load returns with every page resident, so
    the first forward pass reads nothing. Same-dtype CPU tensors stay views (zero copy, no
    private memory). When some byte is not cached yet (``mincore``) and the device's own
    readahead window is small (:func:`~bigmodel.storage.readahead.needs_announcing`), the
    whole read is announced up front (``POSIX_FADV_WILLNEED`` over every range, from a
    background thread) so that the device's queue stays full; a warm load announces nothing.
    When the bytes exceed what the page cache can hold
    (:func:`~bigmodel.storage.page_cache.page_cache_room`), nothing is announced, the thread
    stays within ``io.inflight_bytes`` of the tensor being placed, and the load does not wait
    for the rest. When every byte is cached already (warm), nothing is read ahead: the
    pages are resident, and the views map them as they are used, as fast as before this
    read existed (populating the mapping of a warm 3 GB checkpoint up front was measured
    slower to a ready model on 2 shared cores).
    """
    spans = ckpt.file_spans(keys)
    total = sum(end - begin for ranges in spans.values() for begin, end in ranges)
    # a sample first: counting every page of a warm checkpoint would cost more than it saves
    cached = total if looks_cached(spans) else resident_bytes(spans)
    room = page_cache_room()
    fits = room is None or total - (cached or 0) <= room
    if fits and (cached is None or cached < total) and any(map(needs_announcing, spans)):
        ckpt.readahead(keys)
    views = {key: ckpt.get_tensor(key, readahead=False) for key in keys}
    warm = cached is not None and cached >= total
    shape = mapped_read_shape(ckpt.directory)
    populator = (
        None
        if warm
        else Populator(
            list(views.values()),
            ahead_bytes=None if fits else io.inflight,
            threads=shape.threads,
            chunk_bytes=shape.chunk_bytes,
        )
    )
    return MappedRead(ckpt, views, populator, cached or 0, fits)


def start_early_read(ckpt: Checkpoint, io: IOOptions, *, whole: bool) -> MappedRead | None:
    """For a load that will read every tensor of a local safetensors checkpoint through the
    mapping (``whole``: no device map, one process), start reading at once, in file order,
    so that the disk works while the plan is made; None otherwise."""
    if not whole or ckpt.remote is not None:
        return None
    if ckpt.format != "safetensors" or pick_io(io.mode, ckpt.directory) != "mmap":
        return None
    return start_mapped_read(ckpt, ckpt.file_order(), io)


@contextlib.contextmanager
def _cast_threads(*, busy: int) -> Iterator[None]:
    """Run the casts on at most as many intra-op threads as cores are left beside ``busy``
    background threads (the mapped read and the outputs allocated ahead), at least one.

    A cast split over more threads than there are free cores waits for its slowest part, a
    thread the scheduler put behind a background one: measured on 2 cores, casting a 3 GB
    fp32 model to bf16 into memory already mapped took 0.75-0.82 s on torch's 2 threads and
    0.43-0.49 s on 1. ``torch.set_num_threads`` is process-wide for threads started meanwhile
    (OpenMP: the calling thread's setting); it is restored when the read ends."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wanted = max(1, min(before, (cores or 1) - busy))
    if busy == 0 or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_order(stream: Iterator[tuple[str, torch.Tensor]]) -> Callable[[str], torch.Tensor]:
    """A fetch function over a stream that yields the plan's tensors in the plan's order."""

    def fetch(key: str) -> torch.Tensor:
        got, tensor = next(stream)
        assert got == key, (got, key)  # the stream follows the plan's order
        return tensor

    return fetch


def read_derived(
    reader: PlanReader,
    groups: list[DerivedGroup],
    offload_folder: str | os.PathLike[str] | None = None,
) -> dict[str, OffloadedTensor]:
    """Build the tensors the model's conversions derive from several checkpoint tensors, one
    group at a time, straight into place: each source is read (a view of the file), cast to
    its target's dtype as transformers casts it, the converter's operations run, and each
    result goes to its final device, or, for a disk-offloaded module, is written once into
    the offload folder (returned: what its hooks will read). At most one group's tensors are
    in flight."""
    ties = {name: names for names in tie_groups(reader.targets) for name in names}
    placement, targets = reader.placement, reader.targets
    offloaded: dict[str, OffloadedTensor] = {}
    folder = None
    for group in groups:
        first = next(name for name in group.targets() if name in targets)
        dtype = placement.dtype_for(first, targets[first])
        if is_dtensor(targets[first]):
            _read_derived_slices(reader, group, ties, dtype)
            continue
        built = {k: v for k, v in _build(reader, group, dtype).items() if k in targets}
        to_disk = {k: v for k, v in built.items() if placement.offloaded(k)}
        if to_disk:
            folder = folder or offload_folder_path(offload_folder)
            offloaded |= offload_built(to_disk, ties, targets, dtype, folder)
        for name, value in built.items():
            if name not in to_disk:
                device = placement.device_for(name, targets[name])
                place(reader.model, ties[name], targets[name], value.to(device=device, dtype=dtype))
        del built, to_disk
    return offloaded


def _sources(ckpt: Checkpoint, group: DerivedGroup) -> dict[str, list[torch.Tensor]]:
    """The group's checkpoint tensors by source pattern, in order (views of the files)."""
    sources: dict[str, list[torch.Tensor]] = {}
    for pattern, key in group.sources:
        sources.setdefault(pattern, []).append(ckpt.get_tensor(key))
    return sources


def _build(reader: PlanReader, group: DerivedGroup, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole group, every source read once and counted in the report."""
    for _, key in group.sources:
        reader.report.bytes_read += reader.ckpt.tensor_info(key).nbytes
        reader.report.loaded_keys.append(key)
    return group.build(_sources(reader.ckpt, group), reader.model, dtype)


def _read_derived_slices(
    reader: PlanReader, group: DerivedGroup, ties: Mapping[str, list[str]], dtype: torch.dtype
) -> None:
    """DTensor targets: each rank builds only the region its placement owns. Stacked experts
    read only the experts (and the rows) in that region; any other chain is built whole on
    this rank, then sliced."""
    ckpt, targets = reader.ckpt, reader.targets
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for pattern, key in group.sources:
        shapes.setdefault(pattern, []).append(ckpt.tensor_info(key).shape)
    whole: dict[str, torch.Tensor] | None = None
    state: dict[str, torch.Tensor] = {}
    for name in (n for n in group.targets() if n in targets):
        target = targets[name]

        def region(index: tuple[slice, ...], name: str = name) -> torch.Tensor:
            nonlocal whole
            built = group.build_region(index, shapes, lambda k, i: ckpt.get_slice(k)[i], dtype)
            if built is None:
                if whole is None:
                    whole = group.build(_sources(ckpt, group), reader.model, dtype)
                built = whole[name][index]
            return built

        value, nbytes = local_shard(region, target, dtype=dtype, device=mesh_device(target))
        state.update(dict.fromkeys(ties[name], like(target, value)))
        reader.report.bytes_read += nbytes
    reader.report.loaded_keys.extend(key for _, key in group.sources)
    # load_state_dict(assign=True) lets fully_shard / parallelize_module re-register params
    reader.model.load_state_dict(state, strict=False, assign=True)
