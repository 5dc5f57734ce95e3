"""How much page cache this process can fill before the kernel must reclaim some.

Streaming weights from a file mapping costs one read per use when the streamed bytes cannot
stay cached, and nothing after the first use when they can. Which case holds decides how the
offload hooks treat the pages of a unit that ran (:mod:`bigmodel.execution.offload`): kept
mapped for the next forward to find them, or given back at once
(:func:`bigmodel.storage.readahead.drop_pages`) because they will be evicted anyway.

:func:`page_cache_room` is that room: the smaller of the machine's ``MemAvailable`` and, for
each memory cgroup holding this process (v2, this group and its ancestors; v1, its
hierarchical limit), the limit minus what is charged to it and is not page cache (page cache
charged there is reclaimable, so it counts as room). Linux only; ``None`` elsewhere or when
nothing can be read.

:func:`resident_bytes` says how much of some file ranges is already in the page cache
(``mincore`` on a fresh mapping, which reads nothing): a load whose bytes are all cached skips
announcing the read (the page cache is warm; there is nothing to read). :func:`evict` is the
reverse: it drops a file's pages, so that the next read of it is cold (how the cold-load tests
and benchmarks start).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bigmodel.storage.libc import libc_function

__all__ = ["evict", "looks_cached", "page_cache_room", "resident_bytes"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 writes "no limit" as a number near 2**63


def page_cache_room(*, proc: Path = Path("/proc"), cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes of page cache this process may hold (see the module docstring), or ``None``.

    ``proc`` and ``cgroup_root`` are where ``/proc`` and the cgroup hierarchy are mounted
    (parameters for tests)."""
    rooms = [_mem_available(proc / "meminfo")]
    with contextlib.suppress(OSError, ValueError):
        rooms.append(_cgroup_room((proc / "self" / "cgroup").read_text(), cgroup_root))
    known = [room for room in rooms if room is not None]
    return max(0, min(known)) if known else None


def _mem_available(meminfo: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_room(membership: str, root: Path) -> int | None:
    """The room left by the memory cgroups listed in ``membership`` (/proc/self/cgroup)."""
    for line in membership.splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers and (root / "cgroup.controllers").exists():
            return _v2_room(root, path)
        if "memory" in controllers.split(","):
            return _v1_room(root / "memory", path)
    return None


def _stat(folder: Path) -> dict[str, int]:
    out = {}
    for line in (folder / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _v2_room(root: Path, path: str) -> int | None:
    """cgroup v2: ``memory.max - memory.current + file`` for the group and each ancestor."""
    folder = root / path.strip("/")
    rooms = []
    while folder != root and root in folder.parents:
        limit = folder / "memory.max"
        if limit.exists() and limit.read_text().strip() != "max":
            current = int((folder / "memory.current").read_text())
            cache = _stat(folder).get("file", 0)
            rooms.append(int(limit.read_text()) - current + cache)
        folder = folder.parent
    return min(rooms, default=None)


def _v1_room(hierarchy: Path, path: str) -> int | None:
    """cgroup v1: the hierarchical limit minus the usage that is not page cache. A group path
    that is not visible here (another mount namespace) falls back to the hierarchy's root."""
    folder = hierarchy / path.strip("/")
    if not (folder / "memory.stat").exists():
        folder = hierarchy
    stat = _stat(folder)
    limit = stat.get("hierarchical_memory_limit")
    if limit is None:
        limit = int((folder / "memory.limit_in_bytes").read_text())
    if limit >= _UNLIMITED:
        return None
    usage = int((folder / "memory.usage_in_bytes").read_text())
    cache = stat.get("total_cache", stat.get("cache", 0))
    return limit - usage + cache


# -- what is cached already -----------------------------------------------------------------------

_PAGE = mmap.PAGESIZE


_mmap = libc_function(
    "mmap",
    [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long],
    ctypes.c_void_p,
)
_munmap = libc_function("munmap", [ctypes.c_void_p, ctypes.c_size_t])
_mincore = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
#: False where any of the three is missing (not Linux): nothing can be known of the page cache
_CAN_ASK = all(fn is not None for fn in (_mmap, _munmap, _mincore))


def evict(path: Path | str) -> None:
    """Drop ``path``'s pages from the page cache, dirty ones written back first
    (``fdatasync``, then ``posix_fadvise(POSIX_FADV_DONTNEED)``; no privileges needed), so
    that the next read of it comes from the disk. Raises ``OSError`` as ``open`` does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(spans: Mapping[Path, Sequence[tuple[int, int]]]) -> int | None:
    """Bytes of each file's (begin, end) ranges that are in the page cache now, counted by
    whole pages (a page partly in a range counts for the part inside it); ``None`` where it
    cannot be known (not Linux, a file that does not open). Reads nothing: the file is mapped
    (address space only) and ``mincore`` reports which pages are cached."""
    if not _CAN_ASK:  # pragma: no cover - not Linux
        return None
    total = 0
    for path, ranges in spans.items():
        try:
            total += _file_resident(path, ranges)
        except OSError:
            return None
    return total


def looks_cached(spans: Mapping[Path, Sequence[tuple[int, int]]]) -> bool:
    """Whether the ranges look wholly cached, from a sample of their pages (the first, the
    middle and the last page of each range): a fast answer for the common warm case, where
    asking ``mincore`` about every page of a multi-gigabyte checkpoint costs milliseconds
    per file (measured: 17 ms for 3 GB, against a 0.28 s warm load). False when any sampled
    page is not cached, or when it cannot be known; then :func:`resident_bytes` counts."""
    if not _CAN_ASK:  # pragma: no cover - not Linux
        return False
    try:
        return all(_file_sampled(path, ranges) for path, ranges in spans.items())
    except OSError:
        return False


def _file_sampled(path: Path, ranges: Sequence[tuple[int, int]]) -> bool:
    with _mapped(path) as (base, size):
        flag = (ctypes.c_ubyte * 1)()
        for begin, end in ranges:
            end = min(end, size)
            if end <= begin:
                continue
            for offset in {begin, (begin + end) // 2, end - 1}:
                page = base + offset - offset % _PAGE
                if _mincore(ctypes.c_void_p(page), _PAGE, flag) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
                if not flag[0] & 1:
                    return False
    return True


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[tuple[int, int]]:
    """(address, size) of a read-only shared mapping of ``path`` (address space only: nothing
    is read), unmapped on exit; (0, 0) for an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            yield 0, 0
            return
        base = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    finally:
        os.close(fd)
    try:
        yield base, size
    finally:
        _munmap(ctypes.c_void_p(base), size)


def _file_resident(path: Path, ranges: Sequence[tuple[int, int]]) -> int:
    with _mapped(path) as (base, size):
        if size == 0:
            return 0
        vec = (ctypes.c_ubyte * (-(-size // _PAGE)))()
        if _mincore(ctypes.c_void_p(base), size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        return sum(_range_resident(vec, begin, min(end, size)) for begin, end in ranges)


_LOW_BIT = bytes(i & 1 for i in range(256))


def _range_resident(vec: Any, begin: int, end: int) -> int:
    """Bytes of [begin, end) on pages that ``vec`` (mincore's answer) marks cached."""
    if end <= begin:
        return 0
    first, last = begin // _PAGE, (end - 1) // _PAGE
    flags = ctypes.string_at(ctypes.addressof(vec) + first, last + 1 - first).translate(
        _LOW_BIT
    )  # other bits are reserved
    cached = flags.count(1)
    if cached == len(flags):
        return end - begin
    # exact at the edges: partial first/last pages count for their part inside the range
    full = cached * _PAGE
    if flags[0] & 1:
        full -= begin - first * _PAGE
    if flags[-1] & 1:
        full -= (last + 1) * _PAGE - end
    return max(0, full)
