"""Reading tensors from remote files with concurrent byte-range requests, scheduled by bytes
in flight: the sibling of :mod:`bigmodel.storage.pread` for a URL.

The tensors' byte ranges are first cut into requests of about ``chunk_bytes``
(:func:`plan_requests`): tensors near each other in a file are read together (the plan's
order is close to file order; gaps up to :data:`MAX_GAP` are read and dropped), so a
checkpoint of small tensors costs a few large requests, not one round trip each; a larger
tensor is split, so requests are about the same size and a pool of threads (the client
releases the GIL for the whole request) keeps the connection busy across tensor boundaries.

Memory: the client's response buffers (one per running request) and the tensors requested but
not yet handed to the caller together stay within ``max_inflight_bytes``: at most half of it
goes to running requests (fewer threads when ``chunk_bytes`` is large), the rest is the window
of tensors read ahead (the tensors one request touches, and every request of the tensor the
caller waits for, are always allowed). Over plain HTTP(S) a response is read straight into the
tensors it covers (:mod:`bigmodel.storage.remote_http`); through the object-store client it
is copied once into them. A tensor to be cast (``dtypes``) is allocated in its final dtype and
each part is converted as it arrives, through a bounce buffer per worker, so it never exists
whole in its stored dtype. Large tensors get a mapping of their own, populated in one call by
the worker that fills it and returned to the system as soon as a cast or a move frees it.
Nothing touches the disk, except the optional cache (:mod:`bigmodel.storage.remote_cache`),
which also supplies the files it holds: those ranges are read locally with ``preadv``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigmodel.foundations.errors import InvalidCheckpointError
from bigmodel.storage.remote import RemoteFolder

__all__ = ["MAX_GAP", "Part", "RemoteRange", "Request", "plan_requests", "remote_tensors"]


@dataclass(frozen=True)
class RemoteRange:
    """Where a tensor's bytes are in a remote file (a name under the folder), and what they hold."""

    key: str
    file: str
    begin: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: the local cache's copy of the file, read instead of the server when set
    local: Path | None = None


#: Bytes between a request's span and a tensor that may still join it (read and dropped):
#: tensors come in the plan's order, which is close to, not exactly, file order.
MAX_GAP = 1 << 16


@dataclass(frozen=True)
class Part:
    """Bytes ``[offset, offset + length)`` of tensor ``item`` (an index into the ranges), at
    ``at`` in the file."""

    item: int
    offset: int
    length: int
    at: int


@dataclass
class Request:
    """One range request: bytes ``[start, end)`` of ``file`` (or of its cached copy
    ``local``), and the parts of tensors it fills."""

    file: str
    local: Path | None
    start: int
    end: int
    parts: list[Part] = field(default_factory=list)

    def joins(self, item: RemoteRange, at: int, size: int, chunk_bytes: int) -> bool:
        """Whether ``size`` bytes at ``at`` of ``item`` can be read by this request."""
        start, end = min(self.start, at), max(self.end, at + size)
        return (
            (self.file, self.local) == (item.file, item.local)
            and end - start <= chunk_bytes
            and self.start - MAX_GAP <= at + size
            and at <= self.end + MAX_GAP
        )


def plan_requests(items: list[RemoteRange], chunk_bytes: int) -> list[Request]:
    """The requests that read ``items`` in order: nearby tensors of one file share a request
    up to ``chunk_bytes`` of the file, and a larger tensor is split into requests of that
    size. A request is a contiguous span; gaps of up to :data:`MAX_GAP` bytes inside it are
    read and dropped."""
    requests: list[Request] = []
    for index, item in enumerate(items):
        pos, step = 0, item.dtype.itemsize
        while pos < item.nbytes:
            at, left = item.begin + pos, item.nbytes - pos
            size = _whole(min(chunk_bytes, left), left, step)
            last = requests[-1] if requests else None
            room = chunk_bytes - (last.end - last.start) if last is not None else 0
            if last is not None and at == last.end and room >= min(step, left):
                # fill it up, with whole elements (a part can then be cast on its own)
                size = _whole(min(size, room), left, step)
            if last is None or not last.joins(item, at, size, chunk_bytes):
                last = Request(item.file, item.local, at, at + size)
                requests.append(last)
            last.parts.append(Part(index, pos, size, at))
            last.start, last.end = min(last.start, at), max(last.end, at + size)
            pos += size
    return requests


def _whole(size: int, left: int, step: int) -> int:
    """``size`` bytes of a tensor with ``left`` bytes to go, cut to whole elements of ``step``
    bytes (at least one element)."""
    if size >= left:
        return left
    return max(size - size % step, min(step, left))


#: Tensors from this size up get memory of their own mapping (see :func:`_buffer`).
_OWN_MAPPING = 1 << 20
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def _buffer(nbytes: int) -> tuple[torch.Tensor, mmap.mmap | None]:
    """Memory for one tensor's bytes. A large one is an anonymous mapping of its own: when a
    tensor is cast (``dtype=``) or moved, its bytes go back to the system at once (freed heap
    memory would stay in the process, above the in-flight bound), and a worker can populate
    its pages in one call before copying into them (see :func:`_populate`)."""
    if nbytes < _OWN_MAPPING:
        return torch.empty(nbytes, dtype=torch.uint8), None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8), mapping


def _populate(mapping: mmap.mmap | None, offset: int, length: int) -> None:
    """Fault in the pages of ``[offset, offset + length)`` of ``mapping`` in one call (far
    cheaper than a fault per page while copying); a no-op where the kernel lacks it."""
    if mapping is None or length <= 0:
        return
    start = offset - offset % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(_POPULATE_WRITE, start, offset + length - start)


@dataclass(frozen=True)
class _View:
    """Where one part of a request goes: the destination bytes, their mapping (None: heap
    memory) and offset in it, and the dtypes of a cast (None: the bytes are copied as they
    are)."""

    out: torch.Tensor
    mapping: mmap.mmap | None
    offset: int
    cast: tuple[torch.dtype, torch.dtype] | None = None


_local = threading.local()


def _bounce(nbytes: int) -> torch.Tensor:
    """This worker thread's buffer for bytes that are cast before they reach the tensor (it
    lives as long as the thread: one load)."""
    have: torch.Tensor | None = getattr(_local, "bounce", None)
    if have is None or have.numel() < nbytes:
        have, _local.mapping = _buffer(nbytes)
        _local.bounce = have
    return have[:nbytes]


def _cast_into(view: _View, source: torch.Tensor) -> None:
    """Convert ``source`` (bytes of the stored dtype) into ``view`` (bytes of the target)."""
    assert view.cast is not None
    stored, target = view.cast
    if source.storage_offset() % stored.itemsize:
        source = source.clone()  # misaligned (a gap of odd size before it): view an aligned copy
    view.out.view(target).copy_(source.view(stored))


def _fetch(
    folder: RemoteFolder, fds: dict[Path, int], request: Request, views: list[_View]
) -> None:
    """Read ``request`` into ``views``, one per part (cast parts through a bounce buffer)."""
    for view in views:
        _populate(view.mapping, view.offset, view.out.numel())
    bounce = _bounce(request.end - request.start) if any(v.cast for v in views) else None
    segments: list[tuple[int, torch.Tensor]] = []
    for part, view in zip(request.parts, views, strict=True):
        at = part.at - request.start
        memory = view.out if bounce is None or view.cast is None else bounce[at : at + part.length]
        segments.append((part.at, memory))
    if request.local is not None:
        _read_local(fds[request.local], request.local, segments)
    else:
        segments.sort(key=lambda segment: segment[0])
        folder.read_into(
            request.file, request.start, request.end, [(at, m.numpy().data) for at, m in segments]
        )
    if bounce is not None:
        for part, view in zip(request.parts, views, strict=True):
            if view.cast is not None:
                at = part.at - request.start
                _cast_into(view, bounce[at : at + part.length])


def _read_local(fd: int, path: Path, segments: list[tuple[int, torch.Tensor]]) -> None:
    """Fill ``segments`` ((file offset, memory)) from the cached copy of the file."""
    for at, memory in segments:
        got = os.preadv(fd, [memory.numpy().data], at)
        if got != memory.numel():
            raise InvalidCheckpointError.one(
                str(path),
                "file-changed",
                f"the cached file gave {got} of the {memory.numel()} bytes at {at}: it "
                "changed while it was read.",
                hint="load again (a cache entry is checked, and fetched again when invalid).",
            )


@dataclass
class _Schedule:
    """The state of one :func:`remote_tensors` run."""

    items: list[RemoteRange]
    requests: list[Request]
    #: per item, what it becomes, and its bytes then
    dtypes: list[torch.dtype]
    sizes: list[int]
    outs: list[torch.Tensor | None]
    maps: list[mmap.mmap | None]
    futures: list[list[Future[None]]]
    allocated: int = 0  # items whose memory exists (in order)
    yielded: int = 0
    submitted: int = 0  # requests issued
    #: per item, the index of the last request that fills part of it (-1: none)
    last_request: list[int] = field(default_factory=list)
    inflight: int = 0  # bytes allocated and not yet handed out

    def allocate_through(self, last: int) -> None:
        for index in range(self.allocated, last + 1):
            self.outs[index], self.maps[index] = _buffer(self.sizes[index])
            self.inflight += self.sizes[index]
        self.allocated = max(self.allocated, last + 1)

    def need(self, request: Request) -> int:
        last = max(part.item for part in request.parts)
        return sum(self.sizes[self.allocated : last + 1])

    def view(self, part: Part) -> _View:
        """Where ``part`` goes in its tensor (converted when the tensor is cast)."""
        item, target = self.items[part.item], self.dtypes[part.item]
        out = self.outs[part.item]
        assert out is not None
        if target == item.dtype:
            return _View(
                out[part.offset : part.offset + part.length], self.maps[part.item], part.offset
            )
        ratio = (target.itemsize, item.dtype.itemsize)
        start, length = part.offset * ratio[0] // ratio[1], part.length * ratio[0] // ratio[1]
        return _View(out[start : start + length], self.maps[part.item], start, (item.dtype, target))


def remote_tensors(
    folder: RemoteFolder,
    ranges: Iterable[RemoteRange],
    *,
    max_inflight_bytes: int = 256 * 2**20,
    dtypes: Sequence[torch.dtype | None] | None = None,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(key, tensor)`` for each range, in order, read with concurrent range requests.

    At most ``max_inflight_bytes`` of tensors are requested ahead of the one the caller holds
    (the tensors of one request are always allowed, whatever their size). ``dtypes`` (one per
    range, None: as stored) casts floating-point tensors as their bytes arrive, chunk by
    chunk, so a cast tensor never exists in its stored dtype as a whole.
    """
    items = list(ranges)
    targets = [_target(item, None if dtypes is None else dtypes[i]) for i, item in enumerate(items)]
    chunk = max(1, folder.options.chunk_bytes)
    # The client's response buffers (one per running request) are memory in flight too: the
    # bound covers them and the tensors not yet handed out.
    # A cast part goes through a bounce buffer of the worker's: with the client's buffers,
    # that is a second chunk per running request.
    per_worker = chunk * (
        2 if folder.copies_responses and targets != [item.dtype for item in items] else 1
    )
    workers = max(1, min(folder.options.threads, max_inflight_bytes // (2 * per_worker)))
    window = max(0, max_inflight_bytes - workers * per_worker)
    requests = plan_requests(items, chunk)
    sizes = [
        item.nbytes // item.dtype.itemsize * t.itemsize
        for item, t in zip(items, targets, strict=True)
    ]
    state = _Schedule(
        items,
        requests,
        targets,
        sizes,
        [None] * len(items),
        [None] * len(items),
        [[] for _ in items],
    )
    state.last_request = [-1] * len(items)
    for number, request in enumerate(requests):
        for part in request.parts:
            state.last_request[part.item] = max(state.last_request[part.item], number)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bigmodel-remote")
    fds: dict[Path, int] = {}
    try:
        for path in {item.local for item in items if item.local is not None}:
            fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        while state.yielded < len(items):
            _submit(folder, fds, pool, state, window)
            yield _take(state)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)


def _target(item: RemoteRange, dtype: torch.dtype | None) -> torch.dtype:
    """What ``item`` becomes: ``dtype`` when both are floating point (what ``Tensor.to``
    would make of it), else its stored dtype (the caller converts anything else)."""
    if dtype is None or not (item.dtype.is_floating_point and dtype.is_floating_point):
        return item.dtype
    return dtype


def _submit(
    folder: RemoteFolder,
    fds: dict[Path, int],
    pool: ThreadPoolExecutor,
    state: _Schedule,
    limit: int,
) -> None:
    """Issue the requests the next tensor needs, then more while their tensors fit the
    in-flight bound."""
    while state.submitted < len(state.requests):
        request = state.requests[state.submitted]
        pending = state.yielded < state.allocated
        needed = state.submitted <= state.last_request[state.yielded]
        if not needed and pending and state.inflight + state.need(request) > limit:
            return
        state.allocate_through(max(part.item for part in request.parts))
        views = [state.view(part) for part in request.parts]
        future = pool.submit(_fetch, folder, fds, request, views)
        for part in request.parts:
            state.futures[part.item].append(future)
        state.submitted += 1


def _take(state: _Schedule) -> tuple[str, torch.Tensor]:
    """The next tensor in order, once every request filling it has completed."""
    index = state.yielded
    state.allocate_through(index)  # a tensor no request covers (empty) is allocated here
    for future in state.futures[index]:
        future.result()
    item, out = state.items[index], state.outs[index]
    assert out is not None
    state.outs[index] = state.maps[index] = None  # the tensor keeps its mapping alive
    state.futures[index] = []
    state.inflight -= state.sizes[index]
    state.yielded += 1
    dtype = state.dtypes[index]
    tensor = (
        out.view(dtype).view(item.shape) if item.nbytes else torch.empty(item.shape, dtype=dtype)
    )
    return item.key, tensor
