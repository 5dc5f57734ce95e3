"""Opening the files bigmodel reads: regular files only, never blocking, read within a bound.

Every path bigmodel reads may come from an untrusted folder or index. A FIFO would block
``open()`` forever, a character device (``/dev/zero``) would be read forever, and a directory
or socket is never a checkpoint, so the kind of file is checked on the open descriptor (no
window between a check and the open), which is opened without blocking.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    InvalidCheckpointError,
)

__all__ = ["FileWatch", "file_kind", "open_regular", "read_bounded", "watch_mapping", "watch_open"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _open_fd(path: Path) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{path}: no such file [{CheckpointNotFoundError.code}]. Fix: check the path; if a "
            "save into this folder is running, open the checkpoint again when it finishes."
        ) from None
    except PermissionError:
        raise CheckpointPermissionError(
            f"{path}: permission denied [{CheckpointPermissionError.code}]. Fix: make the file "
            "readable by this user (chmod/chown), or copy the checkpoint somewhere readable."
        ) from None
    except IsADirectoryError:
        raise _not_regular(path, "a directory") from None


def _not_regular(path: Path, kind: str) -> InvalidCheckpointError:
    return InvalidCheckpointError.one(
        str(path),
        "not-a-regular-file",
        f"it is {kind}, not a regular file; bigmodel reads checkpoint files only.",
        hint="point to the checkpoint's folder or to its real files (not a pipe, device or folder).",
    )


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading (buffered) if it is a regular file; otherwise raise a typed
    error naming what it is. Missing and unreadable files raise
    :class:`~bigmodel.CheckpointNotFoundError` and :class:`~bigmodel.CheckpointPermissionError`."""
    fd = _open_fd(path)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, file_kind(mode))
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_bounded(path: Path, limit: int, *, code: str, what: str, hint: str) -> bytes:
    """All of a regular file of at most ``limit`` bytes. A larger file raises
    :class:`~bigmodel.InvalidCheckpointError` with ``code``; at most ``limit + 1`` bytes are
    ever read, whatever size the file claims."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(limit + 1) if size <= limit else b""
    if size <= limit and len(data) <= limit:
        return data
    told = f"{size} bytes" if size > limit else f"larger than {limit} bytes"
    raise InvalidCheckpointError.one(
        str(path), code, f"{what} is {told}, above the {limit}-byte limit.", hint=hint
    )


class FileWatch:
    """Notices when a file that bigmodel has mapped is modified in place or truncated.

    Touching a mapped page past a file's new end kills the process with ``SIGBUS``, and a file
    rewritten in place silently changes what its mapping reads. bigmodel only ever replaces
    files by rename (the old inode stays whole while mapped); other tools (``cp``, ``truncate``,
    an editor) may not. :meth:`check` runs before each of bigmodel's own reads of the mapping
    and turns a change into a typed error instead of a signal or wrong weights.

    ``probe()`` returns the file's current ``(size, modification time or None)`` from an open
    descriptor (a mapping's own: :func:`watch_mapping`; or a dedicated one: :func:`watch_open`),
    never from the path, which a save may legitimately rename over.
    """

    def __init__(self, path: Path, probe: Callable[[], tuple[int, int | None]]) -> None:
        self.path = path
        self._probe: Callable[[], tuple[int, int | None]] | None = probe
        self.opened = probe()

    def check(self) -> None:
        """Raise :class:`~bigmodel.InvalidCheckpointError` (``file-changed``) if the file's size
        (or modification time, where watched) differ from when it was opened."""
        if self._probe is None:
            return
        now = self._probe()
        if now != self.opened:
            raise InvalidCheckpointError.one(
                str(self.path),
                "file-changed",
                f"the file was modified in place while bigmodel had it mapped (size {self.opened[0]} "
                f"bytes when opened, {now[0]} now); reading it could crash the process (SIGBUS) or "
                "return other weights.",
                hint="replace checkpoint files by writing a new file and renaming it (bigmodel's saves "
                "do), never in place; reopen the checkpoint to read the new version; a long-running "
                "process can load with io='pread' to own its weights.",
            )

    def close(self) -> None:
        self._probe = None


def watch_mapping(path: Path, mapping: mmap.mmap) -> FileWatch:
    """Watch the size of a mapped file through the mapping's own descriptor (no extra one)."""
    return FileWatch(path, lambda: (mapping.size(), None))


class _Descriptor:
    def __init__(self, fh: BinaryIO) -> None:
        self.fd = os.dup(fh.fileno())

    def probe(self) -> tuple[int, int | None]:
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def __del__(self) -> None:
        os.close(self.fd)


def watch_open(path: Path, fh: BinaryIO) -> FileWatch:
    """Watch size and modification time through a duplicate of ``fh``'s descriptor (for files
    mapped by someone else, such as torch's ``.bin`` loader); closed with the watch."""
    return FileWatch(path, _Descriptor(fh).probe)
