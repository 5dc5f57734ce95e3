"""Kernel readahead: ask the kernel to read byte ranges of files into the page cache, in the
background, so that later accesses find them cached instead of faulting page by page.

A hint only (``posix_fadvise(POSIX_FADV_WILLNEED)``): errors are ignored, and platforms
without ``posix_fadvise`` do nothing. Called "readahead" throughout bigmodel; "prefetch" is
reserved for the offload hooks reading the next device-map entries ahead of the forward pass.

The offload hooks also use :func:`prefault` (their prefetch thread reads a file-backed tensor
into memory ahead of use), :func:`drop_pages` (a unit that ran gives its mapped pages back
when the streamed part cannot stay cached) and :class:`FileMappings` (which tensors are views
of a file). A load uses :class:`Populator`: a background thread that makes a list of mapped
tensors resident and mapped, in order, so that the load can return with every page in memory
(or cast each tensor once its pages are in) while the next ones are still being read.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import ctypes
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from bigmodel.storage.libc import libc_function

__all__ = [
    "FileMappings",
    "Populator",
    "drop_pages",
    "kernel_window",
    "merge_ranges",
    "needs_announcing",
    "populate_private",
    "prefault",
    "readahead",
    "stop_populators",
]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (begin, end) spans: overlapping or touching ranges become one."""
    out: list[tuple[int, int]] = []
    for begin, end in sorted(ranges):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


BDI_ROOT = Path("/sys/class/bdi")
#: A kernel readahead window at least this large keeps the device busy on its own when a
#: mapping is read in order (measured: 8 MiB windows read 3 GB at the disk's best rate without
#: any WILLNEED, and a whole-file WILLNEED on top was ~20% slower on 2 cores).
LARGE_WINDOW = 4 * 2**20


def kernel_window(path: Path, *, bdi_root: Path = BDI_ROOT) -> int | None:
    """The kernel's readahead window, in bytes, for the device holding ``path`` (its backing
    device's ``read_ahead_kb``, which caps the reads a page fault starts); None if unknown."""
    try:
        dev = os.stat(path).st_dev
        text = (bdi_root / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb").read_text()
        return int(text) * 1024
    except (OSError, ValueError):
        return None


def needs_announcing(path: Path) -> bool:
    """Whether reading ``path``'s mapping in order needs its reads announced up front
    (``POSIX_FADV_WILLNEED``) to keep the device's queue full: yes unless the kernel's own
    readahead window is large (:data:`LARGE_WINDOW`), as page faults alone then issue large,
    overlapping reads. With the common 128 KiB window, faults read 128 KiB at a time."""
    window = kernel_window(path)
    return window is None or window < LARGE_WINDOW


def _advise(spans: dict[Path, list[tuple[int, int]]]) -> None:
    for path, ranges in spans.items():
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                for begin, end in ranges:
                    os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def readahead(spans: dict[Path, list[tuple[int, int]]]) -> int:
    """Start kernel readahead of each file's (begin, end) byte ranges from a background thread.

    Returns the number of bytes advised (after merging), at once; 0 where the platform lacks
    ``posix_fadvise``.
    """
    if getattr(os, "posix_fadvise", None) is None:  # pragma: no cover - not Linux/BSD
        return 0
    merged = {path: merge_ranges(ranges) for path, ranges in spans.items() if ranges}
    if merged:
        threading.Thread(
            target=_advise, args=(merged,), name="bigmodel-readahead", daemon=True
        ).start()
    return sum(end - begin for ranges in merged.values() for begin, end in ranges)


# -- populating a mapping now, and telling mappings from private memory ---------------------------

_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14+
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = mmap.PAGESIZE


_madvise_fn = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def prefault(tensors: Iterable[torch.Tensor]) -> int:
    """Bring CPU tensors' pages into memory now, in the calling thread, and map them.

    For views of a file mapping this is the read itself, done ahead of use: for each span of
    adjacent tensors (merged, so a block is one or two spans), the kernel is told the whole
    range is needed (``MADV_WILLNEED``: large reads, not page-sized faults), then the pages
    are faulted in and mapped (``MADV_POPULATE_READ``), waiting for the I/O (ctypes releases
    the GIL meanwhile). Whoever then computes on the tensors finds them mapped and pays no
    page faults; pages already mapped cost a page-table walk. Private memory is left as it
    is. Where ``MADV_POPULATE_READ`` is missing, one byte per page is read instead. Returns
    the bytes covered (0 where nothing can be done: not Linux)."""
    if _madvise_fn is None:  # pragma: no cover - not Linux
        return 0
    covered = 0
    for begin, end in _page_spans(tensors, outward=True):
        _prefault_span(begin, end)
        covered += end - begin
    return covered


def populate_private(tensor: torch.Tensor) -> int:
    """Map the pages of a freshly allocated CPU tensor now, in the calling thread, without
    changing its content: the page faults (and the kernel's zeroing of fresh pages) happen
    here instead of in whoever writes the tensor first.

    Only the page-aligned interior of the tensor's data is populated
    (``MADV_POPULATE_WRITE``), never a page it shares with a neighbouring allocation. Where
    that is missing (kernels before 5.14), one byte per page is written (the tensor's content
    is undefined until written anyway: meant for ``torch.empty`` outputs). Returns the bytes
    populated (0 where nothing can be done: not Linux, not CPU, smaller than a page)."""
    if _madvise_fn is None:  # pragma: no cover - not Linux
        return 0
    covered = 0
    for begin, end in _page_spans([tensor], outward=False):
        if _madvise_fn(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_POPULATE_WRITE):
            pages = (ctypes.c_ubyte * (end - begin)).from_address(begin)  # pragma: no cover
            torch.frombuffer(pages, dtype=torch.uint8)[::_PAGE] = 0  # pragma: no cover
        covered += end - begin
    return covered


def drop_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Unmap from this process the pages of file-backed CPU tensors that are done with
    (``MADV_DONTNEED``), so that the kernel reclaims them as plain clean page cache.

    Meant for streaming more than memory holds: pages still mapped are expensive to reclaim
    (the kernel must walk the mappings and gives referenced pages a second round), so when the
    streamed bytes must be evicted anyway, reading the next unit is faster once the last one
    is unmapped. The pages stay in the page cache (nothing is evicted here, other processes
    are not affected); a later access to the tensors maps them again from the cache, or reads
    them from the file. Only pages lying wholly within the merged spans of ``tensors`` are
    dropped, never a page shared with a neighbouring tensor. Only for read-only views of a
    file: private (copy-on-write) changes to those pages would be discarded. Returns the bytes
    dropped (0 where nothing can be done: not Linux)."""
    if _madvise_fn is None:  # pragma: no cover - not Linux
        return 0
    dropped = 0
    for begin, end in _page_spans(tensors, outward=False):
        if _madvise_fn(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_DONTNEED) == 0:
            dropped += end - begin
    return dropped


def _page_spans(tensors: Iterable[torch.Tensor], *, outward: bool) -> list[tuple[int, int]]:
    """Merged page-aligned address spans of CPU tensors' data: rounded outward (every page
    the data touches) or inward (only the pages it covers whole); empty spans are left out."""
    spans = []
    for tensor in tensors:
        length = tensor.numel() * tensor.element_size()
        if length and tensor.device.type == "cpu":
            spans.append((tensor.data_ptr(), tensor.data_ptr() + length))
    if outward:
        return merge_ranges((b - b % _PAGE, -(-e // _PAGE) * _PAGE) for b, e in spans)
    inward = ((-(-b // _PAGE) * _PAGE, e - e % _PAGE) for b, e in merge_ranges(spans))
    return [(begin, end) for begin, end in inward if begin < end]


def _touch(begin: int, size: int) -> None:
    """Read one byte of every page of [begin, begin + size) (kernels before 5.14)."""
    pages = (ctypes.c_ubyte * size).from_address(begin)
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    int(flat[::_PAGE].sum())


class FileMappings:
    """The address ranges of this process's file-backed mappings (``/proc/self/maps``), read
    once, to tell a tensor that is a view of a file (evictable page cache) from private memory.
    Shared-memory files (``/dev/shm``) count as private: they are not page cache of a file on
    disk. Empty where ``/proc`` is missing."""

    def __init__(self) -> None:
        spans: list[tuple[int, int]] = []
        with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if (
                    parts[4] == "0"
                    or not path.startswith("/")
                    or path.startswith(("/dev/", "/memfd:"))
                ):
                    continue
                begin, _, end = parts[0].partition("-")
                spans.append((int(begin, 16), int(end, 16)))
        self._spans = merge_ranges(spans)
        self._begins = [begin for begin, _ in self._spans]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s data lies in a file-backed mapping."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        address = tensor.data_ptr()
        i = bisect.bisect_right(self._begins, address) - 1
        return i >= 0 and address < self._spans[i][1]


class Populator:
    """Make CPU tensors' pages resident and mapped, in order, from background threads.

    For views of a file mapping this is the read itself (:func:`prefault`: ``MADV_WILLNEED``
    then ``MADV_POPULATE_READ``, in pieces of at most ``chunk_bytes``, so that the consumer
    learns of each tensor as soon as it is in), then, with ``touch``, one byte of every page
    is read: in a VM, the first access to a page the host has not backed yet costs a host
    fault even when the guest has it mapped (measured: 0.2-0.6 s of first touches for 3 GB
    after the load returned), and that cost is better paid here, while the disk reads on.
    The consumer calls :meth:`wait` ``(i)`` before it computes on tensor ``i`` (a cast then
    reads pages that are in memory, while the thread is already reading the tensors after it)
    and :meth:`join` when it needs them all.

    ``threads`` threads take the pieces in order, each the next one not taken; tensor ``i`` is
    resident once every piece up to its last is. One thread suits a local disk, whose own
    readahead keeps the device busy (measured: 2 or 3 threads made a cold 3 GB load 20-35%
    slower on 2 cores); where each read request is a round trip (network and FUSE
    filesystems, whose readahead window is small), several pieces in flight hide the round
    trips (see :func:`bigmodel.storage.pread.mapped_read_shape`).

    ``ahead_bytes`` bounds how far the threads run ahead of the tensor the consumer waits for
    (``None``: no bound, for tensors that all stay mapped anyway); with a bound, pages read
    ahead of a cast cannot pile up beyond it and be evicted before they are used. Private
    memory is left as it is. Errors of a thread are raised by :meth:`wait` and :meth:`join`.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        chunk_bytes: int = 64 * 2**20,
        ahead_bytes: int | None = None,
        touch: bool = True,
        threads: int = 1,
    ) -> None:
        self._touch = touch
        self._tensors: list[torch.Tensor | None] = list(tensors)
        #: bytes of the tensors before tensor i: what lies between two of them, in O(1)
        self._before = list(itertools.accumulate((t.nbytes for t in tensors), initial=0))
        chunk = max(_PAGE, chunk_bytes - chunk_bytes % _PAGE)
        #: the work, in order: (tensor index, begin, end) address pieces of at most ``chunk``
        self._pieces: list[tuple[int, int, int]] = []
        self._ends: list[int] = []  # tensor i is resident once pieces [0, _ends[i]) are
        self._addresses = [t.data_ptr() for t in tensors]
        for i, tensor in enumerate(tensors):
            if tensor.device.type == "cpu" and tensor.numel():
                for begin, end in _page_spans([tensor], outward=True):
                    self._pieces += [
                        (i, at, min(end, at + chunk)) for at in range(begin, end, chunk)
                    ]
            self._ends.append(len(self._pieces))
        self._claimed = 0  # pieces [0, _claimed) are taken by a thread
        self._finished = [False] * len(self._pieces)
        self._frontier = 0  # pieces [0, _frontier) are all resident
        self._ahead = ahead_bytes
        self._done = 0  # tensors [0, _done) are resident
        self._wanted = 0  # the tensor the consumer waits for (or used last)
        self._error: BaseException | None = None
        self._stop = False
        self._final = False  # no consumer will ask for more than it has asked for
        self._cv = threading.Condition()
        self.bytes = self._before[-1]
        self._threads = [
            threading.Thread(target=self._run, name="bigmodel-populate", daemon=True)
            for _ in range(max(1, min(threads, len(self._pieces))))
        ]
        with self._cv:
            self._settle()  # tensors with nothing to read (empty, not on the CPU) at the front
        _register(self)
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        try:
            while (k := self._claim()) is not None:
                _, begin, end = self._pieces[k]
                _prefault_span(begin, end)
                if self._touch:
                    _touch(begin, end - begin)
                with self._cv:
                    self._finished[k] = True
                    self._settle()
        except BaseException as exc:  # pragma: no cover - madvise errors are not raised
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _claim(self) -> int | None:
        """The next piece to read, once the bound allows it; None when done or stopped."""
        with self._cv:
            while True:
                k = self._claimed
                if self._stop or k >= len(self._pieces):
                    return None
                i = self._pieces[k][0]
                if self._final and i > self._wanted:
                    return None
                if (
                    self._ahead is None
                    or self._final
                    or i <= self._wanted
                    or self._before[i] - self._before[self._wanted] <= self._ahead
                ):
                    self._claimed = k + 1
                    return k
                self._cv.wait()

    def _settle(self) -> None:
        """Move the frontier past the finished pieces and mark the tensors that are now whole
        (called with the condition held)."""
        while self._frontier < len(self._pieces) and self._finished[self._frontier]:
            self._frontier += 1
        done = bisect.bisect_right(self._ends, self._frontier)
        if done > self._done:
            for i in range(self._done, done):
                self._tensors[i] = None  # the consumer holds it; the mapping keeps its pages
            self._done = done
            self._cv.notify_all()

    def advance(self, i: int) -> None:
        """The consumer is at tensor ``i``: the thread may read up to the bound past it."""
        with self._cv:
            if i > self._wanted:
                self._wanted = i
                self._cv.notify_all()

    def wait(self, i: int) -> None:
        """Block until tensor ``i`` (its index in the list given) is resident."""
        self._wait_for(i, self._ends[i])

    def wait_prefix(self, i: int, nbytes: int) -> None:
        """Block until the first ``nbytes`` bytes of tensor ``i`` are resident (and every
        tensor before it): a consumer converting a large tensor piece by piece starts on its
        first pieces while the rest of it is still being read."""
        # the pieces of tensor i that begin before the prefix ends (they are in address order)
        needed = bisect.bisect_left(
            self._pieces,
            self._addresses[i] + nbytes,
            lo=self._ends[i - 1] if i else 0,
            hi=self._ends[i],
            key=lambda piece: piece[1],
        )
        self._wait_for(i, needed)

    def _wait_for(self, i: int, pieces: int) -> None:
        """Block until pieces [0, ``pieces``) are resident, the consumer being at tensor ``i``."""
        with self._cv:
            self._wanted = max(self._wanted, i)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._frontier >= pieces or self._error is not None)
            if self._error is not None:
                raise self._error

    def join(self) -> None:
        """Block until every tensor is resident."""
        if self._tensors:
            self.wait(len(self._tensors) - 1)
        for thread in self._threads:
            thread.join()

    def finish(self) -> None:
        """No more :meth:`advance`: read up to the last tensor asked for, then stop (for a
        reader that closed its checkpoint and still holds the tensors it asked for)."""
        with self._cv:
            self._final = True
            self._cv.notify_all()

    def cancel(self, *, wait: bool = True) -> None:
        """Stop after the piece being read (a load that failed, a reader gone); returns once
        stopped, or at once with ``wait=False``."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()


def _prefault_span(begin: int, end: int) -> None:
    """:func:`prefault` of one page-aligned address span."""
    if _madvise_fn is None:  # pragma: no cover - not Linux
        return
    size = ctypes.c_size_t(end - begin)
    _madvise_fn(ctypes.c_void_p(begin), size, _MADV_WILLNEED)
    if _madvise_fn(ctypes.c_void_p(begin), size, _MADV_POPULATE_READ) != 0:
        _touch(begin, end - begin)


_LIVE: weakref.WeakSet[Populator] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_HOOKED = False


def _register(populator: Populator) -> None:
    """Remember a running :class:`Populator` so that interpreter exit can stop it first."""
    global _HOOKED
    with _LIVE_LOCK:
        _LIVE.add(populator)
        if not _HOOKED:
            atexit.register(stop_populators)
            _HOOKED = True


def stop_populators() -> None:
    """Stop every running :class:`Populator` and wait for it (registered with ``atexit``).

    A populate thread is a daemon (a reader that is dropped must not keep the process alive),
    but it runs torch operations on mapped pages: one still inside such an operation while
    the interpreter tears torch down aborts the process ("terminate called without an active
    exception", seen with a checkpoint read in order and the process exiting right after).
    Each thread stops after the piece it is reading (at most ``chunk_bytes``)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for populator in live:
        populator.cancel(wait=True)
