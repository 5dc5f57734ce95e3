"""How bytes reach the disk: temporary names, full writes, fsync of files and directories.

Nothing above the storage layer opens a file for writing; the save orchestration composes
these primitives into its commit protocol (see :mod:`bigmodel.storage.commit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from bigmodel.foundations.log import logger
from bigmodel.storage.libc import libc_function

__all__ = [
    "ALIAS_MARKER",
    "TEMP_MARKER",
    "alias_name",
    "file_identity",
    "fsync_dir",
    "new_token",
    "open_temp",
    "preallocate",
    "temp_name",
    "write_all",
]

#: Infix of files a save writes before publishing them; a leftover one is debris of a killed save.
TEMP_MARKER = ".bigmodel-tmp-"
#: Infix of hard links that keep a previous checkpoint loadable while a save replaces its files.
ALIAS_MARKER = ".bigmodel-old-"


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells two versions of a path apart: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def new_token() -> str:
    """A short random token that makes one save's temporary names unique."""
    return secrets.token_hex(6)


def temp_name(final_name: str, token: str) -> str:
    """Hidden temporary name for ``final_name`` (``.model.safetensors.bigmodel-tmp-ab12``)."""
    return f".{final_name}{TEMP_MARKER}{token}"


def alias_name(final_name: str, token: str) -> str:
    """Name of the hard link that keeps ``final_name``'s old content alive, same extension."""
    stem, dot, ext = final_name.rpartition(".")
    if not dot:
        return f"{final_name}{ALIAS_MARKER}{token}"
    return f"{stem}{ALIAS_MARKER}{token}.{ext}"


def write_all(fh: BinaryIO, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` (raw files may accept fewer bytes than offered)."""
    view = memoryview(data).cast("B")
    while view:
        written = fh.write(view)
        if written is None:  # pragma: no cover - only non-blocking files return None
            raise BlockingIOError("non-blocking write made no progress")
        if written == 0:  # never spin: a file that accepts nothing is full
            raise OSError(errno.ENOSPC, "write accepted no bytes", getattr(fh, "name", None))
        view = view[written:]


#: ``fallocate(2)`` mode: allocate blocks past the end without changing the file's size, so a
#: file always ends where its last write ended, whatever size was announced.
FALLOC_FL_KEEP_SIZE = 0x01
#: Errors after which a file is simply written without preallocation: the filesystem cannot
#: preallocate (EOPNOTSUPP, ENOSYS, EINVAL: tmpfs variants, FUSE, NFS < 4.2), or it refuses the
#: reservation up front (ENOSPC, EDQUOT: the write itself then says whether the bytes fit).
_NO_PREALLOCATION = frozenset(
    {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOSPC, errno.EDQUOT, errno.EPERM}
)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate(fd, mode, offset, length)``, or None where there is none (not Linux).

    Not ``os.posix_fallocate``: where the filesystem cannot preallocate, glibc emulates it by
    writing one byte into every block, which costs more than the write it prepares.
    """
    args = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn: Callable[[int, int, int, int], int] | None = libc_function("fallocate", args)
    return fn


def preallocate(fh: BinaryIO, size: int) -> bool:
    """Reserve ``size`` bytes of disk for the file ``fh`` is about to receive, in one extent
    allocation rather than one per written page (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``:
    the file's size still grows only with what is written).

    A hint: returns False, having changed nothing, where the file has no descriptor, the
    platform has no ``fallocate`` or the filesystem refuses (see :data:`_NO_PREALLOCATION`).
    """
    fallocate = _fallocate()
    if fallocate is None or size <= 0:
        return False
    try:
        fd = fh.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    if fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) == 0:
        return True
    code = ctypes.get_errno()
    if code not in _NO_PREALLOCATION:
        raise OSError(code, os.strerror(code), getattr(fh, "name", None))
    logger.debug("no preallocation of %s: %s", getattr(fh, "name", fd), os.strerror(code))
    return False


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_temp(path: Path, *, durable: bool) -> Iterator[BinaryIO]:
    """Open ``path`` for a fresh unbuffered write; on success flush and (if durable) fsync it.

    On any exception the partial file is removed before the exception propagates.
    """
    fh = open(path, "xb", buffering=0)  # noqa: SIM115 - closed in the finally below
    ok = False
    try:
        yield fh
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
        ok = True
    finally:
        fh.close()
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
