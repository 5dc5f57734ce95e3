"""Reading tensors with parallel ``pread`` calls, scheduled by bytes in flight.

The default way bigmodel reads is the file mapping (zero copy, the page cache shared between
processes), on every filesystem (:func:`pick_io`). ``io="pread"`` reads tensors with
``os.preadv`` into private memory instead, for a caller that wants the weights to be its own
memory (a file that may change under a long-running server):

* each tensor is split into chunks (``chunk_bytes``) read by a pool of threads, which release
  the GIL while the kernel reads, so several requests keep the device busy;
* reads are issued in file order while the bytes read but not yet consumed stay within
  ``max_inflight_bytes`` (at least one tensor is always allowed), so memory is bounded by the
  bound, not by the number of threads;
* tensors are yielded in order as they complete; a caller that converts each one (dtype,
  device) does so while the next ones are being read.

With an unchanged dtype, the chunks land straight in the tensor that is returned: one private
copy, no staging.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from bigmodel.foundations.errors import InvalidCheckpointError
from bigmodel.foundations.types import IO_MODES
from bigmodel.storage.libc import libc_function

__all__ = [
    "ByteRange",
    "filesystem_magic",
    "is_network_filesystem",
    "LOCAL_READ",
    "NETWORK_READ",
    "MappedReadShape",
    "mapped_read_shape",
    "pick_io",
    "pread_tensors",
]

#: Filesystem types where page-faulting a mapping is slow; ``io="auto"`` reads with pread there.
REMOTE_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "virtiofs",
        "afs",
    }
)


#: ``statfs`` magic numbers (``f_type``) of network and FUSE filesystems (linux/magic.h and
#: the filesystems' own headers); ``io="auto"`` reads with pread there.
NETWORK_MAGIC = {
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x517B: "smbfs",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x65735546: "fuse",  # also virtiofs, s3fs, gcsfuse, glusterfs' client, ...
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x19830326: "beegfs",
    0x5346414F: "afs",
    0x6B414653: "afs",
}


def filesystem_magic(path: Path) -> int | None:
    """``statfs(path).f_type``: the magic number of the filesystem holding ``path`` (Linux;
    None elsewhere or on error). Unlike /proc/self/mounts it needs no parsing and follows
    the path as the kernel resolves it (bind mounts, symlinks)."""
    if _statfs is None:  # pragma: no cover - not Linux
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type, the first field


_statfs = libc_function("statfs", [ctypes.c_char_p, ctypes.c_void_p])


@dataclass(frozen=True)
class ByteRange:
    """Where a tensor's bytes are: file, absolute offset, length, and what they hold."""

    key: str
    path: Path
    begin: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts; '' if unknown)."""
    try:
        target = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
        return kind
    except OSError:
        return ""


def is_network_filesystem(path: Path) -> bool:
    """Whether ``path`` is on a network or FUSE filesystem: by ``statfs`` magic
    (:data:`NETWORK_MAGIC`), else by the type /proc/self/mounts gives
    (:data:`REMOTE_FILESYSTEMS`)."""
    magic = filesystem_magic(path)
    if magic is not None:
        return magic in NETWORK_MAGIC
    kind = filesystem_type(path)
    return kind in REMOTE_FILESYSTEMS or kind.startswith("fuse")


def pick_io(io: str, path: Path) -> str:
    """Resolve ``io=``: ``"mmap"`` or ``"pread"`` as given; ``"auto"`` is the mapping, on every
    filesystem: read in order in the background by a
    :class:`~bigmodel.storage.readahead.Populator` (:func:`mapped_read_shape`: threads and
    piece size by filesystem), it stays zero copy and reads about as fast as parallel preads.

    Measured cold and warm with ``benchmarks/bench_io_choice.py`` (a local disk, a C FUSE
    passthrough, and a FUSE filesystem that adds a round trip to every read request): the
    mapping was faster or tied everywhere at 3 GB (cold: local disk 1.66x, C passthrough
    1.12x, 0.25 ms round trips 1.11x, 1 ms a tie; warm 1.11-7.73x); at 0.3 GB, parallel preads
    were 8% faster cold on the local disk only. Parallel preads also make a private copy of
    every byte. ``path`` is where the checkpoint lies; the filesystem only changes how the
    mapping is read (:func:`mapped_read_shape`)."""
    if io not in IO_MODES:
        raise ValueError(f"io={io!r}: choose one of {', '.join(IO_MODES)}.")
    return "mmap" if io == "auto" else io


class MappedReadShape(NamedTuple):
    """How a :class:`~bigmodel.storage.readahead.Populator` reads a mapping: how many threads,
    and the most bytes each asks for at a time."""

    threads: int
    chunk_bytes: int


#: A local disk: one thread, 64 MiB at a time (the disk's own readahead keeps its queue full;
#: 2-3 threads measured 20-35% slower on a cold 3 GB load).
LOCAL_READ = MappedReadShape(threads=1, chunk_bytes=64 * 2**20)
#: A network or FUSE filesystem: each read request is a round trip (readahead windows are
#: small, 128 KiB on FUSE) and one thread waits for each in turn, so many small pieces are kept
#: in flight. Measured on 300 MB with 1 ms round trips (benchmarks/bench_io_choice.py's FUSE
#: filesystem): one thread 1.58 s; 4 x 64 MiB 0.67 s; 4 x 16 MiB 0.51 s; 8 x 8 MiB 0.48-0.49 s,
#: about what 16 threads and parallel preads reach.
NETWORK_READ = MappedReadShape(threads=8, chunk_bytes=8 * 2**20)


def mapped_read_shape(path: Path) -> MappedReadShape:
    """How to read a mapping of the files at ``path`` in order: :data:`NETWORK_READ` on network
    and FUSE filesystems (:func:`is_network_filesystem`), :data:`LOCAL_READ` elsewhere."""
    return NETWORK_READ if is_network_filesystem(path) else LOCAL_READ


def _read_chunk(fd: int, view: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InvalidCheckpointError.one(
                where,
                "truncated",
                f"the file ended {len(view) - done} bytes short of a tensor's data (offset {offset + done}).",
                hint="the file changed or was truncated while it was read; re-download or re-save it.",
            )
        done += n


def pread_tensors(
    ranges: Iterable[ByteRange],
    *,
    max_inflight_bytes: int = 256 * 2**20,
    chunk_bytes: int = 16 * 2**20,
    threads: int = 4,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for each range, in order, read with parallel preads.

    At most ``max_inflight_bytes`` of tensors are read ahead of the one the caller holds (one
    tensor is always allowed, whatever its size).
    """
    items = list(ranges)
    fds: dict[Path, int] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bigmodel-pread")
    pending: deque[tuple[ByteRange, torch.Tensor, list[Future[None]]]] = deque()
    try:
        for item in items:
            if item.path not in fds:
                fds[item.path] = os.open(item.path, os.O_RDONLY)
        position = 0

        def submit() -> None:
            nonlocal position
            item = items[position]
            out = torch.empty(item.nbytes, dtype=torch.uint8)
            view = out.numpy().data if item.nbytes else memoryview(b"")
            futures = [
                pool.submit(
                    _read_chunk,
                    fds[item.path],
                    view[start : start + chunk_bytes],
                    item.begin + start,
                    str(item.path),
                )
                for start in range(0, item.nbytes, chunk_bytes)
            ]
            pending.append((item, out, futures))
            position += 1

        while position < len(items) or pending:
            while position < len(items) and (
                not pending
                or sum(p[0].nbytes for p in pending) + items[position].nbytes <= max_inflight_bytes
            ):
                submit()
            item, out, futures = pending.popleft()
            for future in futures:
                future.result()
            tensor = (
                out.view(item.dtype).view(item.shape)
                if item.nbytes
                else torch.empty(item.shape, dtype=item.dtype)
            )
            yield item.key, tensor
            del tensor, out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
