"""A local cache of remote checkpoint files (``RemoteOptions(cache_dir=...)``): what a load
reads is kept, validated, and reused by the next load instead of the network.

Layout: ``cache_dir/<key>/<file name>``, where ``<key>`` is a hash of the folder URL without
its credentials and query string (a pre-signed URL's signature changes; the files do not), and
a file name is one the checkpoint layer already checked to be a plain name, so no entry can
leave its folder.

Filling: every byte range read from a registered file (:meth:`RemoteCache.expect`, done when
its header is fetched) is also written, with ``pwrite``, into a private temporary file beside
the entry (:func:`~bigmodel.storage.atomic.temp_name`, named with the writer's pid and a random
token, and held under an exclusive ``flock`` until it is published or dropped). When the
ranges read cover the whole file, the file is flushed to disk, its digest is checked when one
is known, and it is renamed over the entry in one step: a reader sees either no entry or a
complete one, and concurrent loads filling the same entry each write their own temporary file
and replace the entry with identical bytes. A file the load did not read whole (a partial
load, an interrupted one) leaves nothing behind when the checkpoint is closed.

Debris: a process killed while filling (``kill -9``, out of memory) leaves its temporary file
behind. Opening a cache folder removes such files, and only those: a temporary is removed when
the process named in it is gone *and* its lock can be taken (the kernel releases a ``flock``
when its holder dies), so a file another live process is writing, on this host or on another
one sharing the folder, is never touched. A temporary without a pid (an older version's) is
removed once it is a day old.

Reuse: an entry is used only if its size is the size the server announces now and, when a
digest is known (the index's record, else the one embedded in the file's header), its
contents hash to it (xxh3 hashes at memory speed); its header is parsed by the local parser.
Anything else is logged, ignored and fetched again (and the entry replaced).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bigmodel.foundations.errors import BigModelError
from bigmodel.foundations.log import logger
from bigmodel.storage.atomic import TEMP_MARKER, fsync_dir, new_token, temp_name
from bigmodel.storage.digest import DIGEST_KEY, buffer_digest
from bigmodel.storage.safetensors import SafetensorsFile

try:
    import fcntl

    _HAS_FLOCK = True
except ImportError:  # pragma: no cover - Windows: no flock, temporaries are never swept
    _HAS_FLOCK = False

__all__ = ["RemoteCache", "sweep_temporaries"]

#: A temporary file's name: ``.<entry>.bigmodel-tmp-<pid>-<token>`` (``<token>`` alone before).
_TEMP = re.compile(r"^\..+" + re.escape(TEMP_MARKER) + r"(?:(\d+)-)?[0-9a-f]+$")
#: Age after which a temporary without a pid is taken for debris.
_OLD_TEMP_SECONDS = 24 * 3600


@dataclass
class _Fill:
    """One file being kept: its temporary file, size, expected digest and the byte intervals
    written so far (merged, sorted)."""

    temp: Path
    fd: int
    size: int
    digest: str | None
    spans: list[tuple[int, int]] = field(default_factory=list)

    def add(self, start: int, end: int) -> int:
        """Record ``[start, end)`` as written; the bytes covered so far."""
        at = bisect.bisect_left(self.spans, (start, end))
        spans = [*self.spans[:at], (start, end), *self.spans[at:]]
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.spans = merged
        return sum(e - s for s, e in merged)


class RemoteCache:
    """The cache entries of one remote folder (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike[str], folder_key: str) -> None:
        digest = hashlib.sha256(folder_key.encode("utf-8")).hexdigest()[:32]
        self.root = Path(cache_dir) / digest
        self._fills: dict[str, _Fill] = {}
        self._lock = threading.Lock()
        sweep_temporaries(self.root)

    def lookup(self, name: str, size: int, digest: str | None) -> SafetensorsFile | None:
        """The cached file ``name``, opened, if it is ``size`` bytes and matches ``digest`` (or
        the digest its header embeds); else None (and the reason is logged)."""
        path = self.root / name
        try:
            if path.stat().st_size != size:
                logger.info("cache entry %s is not %d bytes: fetching it again", path, size)
                return None
            reader = SafetensorsFile(path)
        except FileNotFoundError:
            return None
        except (BigModelError, OSError) as exc:
            logger.info("cache entry %s cannot be read (%s): fetching it again", path, exc)
            return None
        expected = digest or reader.metadata.get(DIGEST_KEY)
        if expected is not None:
            embedded = reader.metadata.get(DIGEST_KEY) == expected
            if buffer_digest(reader.mapping(), expected, embedded=embedded) != expected:
                reader.close()
                logger.warning("cache entry %s does not match its digest: fetching it again", path)
                return None
        return reader

    def expect(self, name: str, size: int, digest: str | None) -> None:
        """Keep what is read of ``name`` (``size`` bytes). Before the entry is published its
        contents are checked against ``digest``, else the digest its header embeds, if any."""
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.root / temp_name(name, f"{os.getpid()}-{new_token()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if _HAS_FLOCK:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process writes it (see sweep)
        with self._lock:
            old = self._fills.pop(name, None)
            self._fills[name] = _Fill(temp, fd, size, digest)
        if old is not None:
            _drop(old)

    def store(self, name: str, start: int, data: memoryview) -> None:
        """Write the bytes read from ``name`` at ``start`` into its temporary file; publish the
        entry when the whole file has been read."""
        if name not in self._fills or not len(data):
            return
        with self._lock:  # held while writing: close() never closes a descriptor in use
            fill = self._fills.get(name)
            if fill is None:
                return
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(fill.fd, data[written:], start + written)
            except OSError as exc:  # a full disk: the load goes on without the cache
                logger.warning("could not cache %s in %s: %s", name, self.root, exc)
                del self._fills[name]
                _drop(fill)
                return
            if fill.add(start, start + len(data)) < fill.size:
                return
            del self._fills[name]
        self._publish(name, fill)

    def _publish(self, name: str, fill: _Fill) -> None:
        """Flush, check the digest, and rename the complete file over the entry."""
        try:
            os.fsync(fill.fd)
            reader = SafetensorsFile(fill.temp)  # the header, checked again as it was written
            try:
                expected = fill.digest or reader.metadata.get(DIGEST_KEY)
                embedded = reader.metadata.get(DIGEST_KEY) == expected
                ok = expected is None or (
                    buffer_digest(reader.mapping(), expected, embedded=embedded) == expected
                )
            finally:
                reader.close()
            if not ok:
                logger.warning(
                    "%s read from the server does not match its digest; not cached", name
                )
                _drop(fill)
                return
            os.replace(fill.temp, self.root / name)  # still locked: never swept half-way
            os.close(fill.fd)
            fill.fd = -1
            fsync_dir(self.root)
            logger.info("cached %s in %s", name, self.root)
        except (BigModelError, OSError) as exc:  # a cache that cannot be written is no error
            logger.warning("could not cache %s in %s: %s", name, self.root, exc)
            _drop(fill)

    def close(self) -> None:
        """Remove the temporary files of entries that were not read whole."""
        with self._lock:
            fills, self._fills = list(self._fills.values()), {}
        for fill in fills:
            _drop(fill)


def _drop(fill: _Fill) -> None:
    with contextlib.suppress(FileNotFoundError):
        fill.temp.unlink()  # unlinked while still locked
    if fill.fd >= 0:
        os.close(fill.fd)
        fill.fd = -1


def sweep_temporaries(root: Path) -> int:
    """Remove the temporary files in ``root`` whose writer is gone (see the module docstring);
    returns how many were removed. Never raises: a cache that cannot be swept is no error."""
    if not _HAS_FLOCK:  # pragma: no cover
        return 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = _TEMP.match(name)
        if match is not None and _stale(root / name, match.group(1)):
            removed += 1
    if removed:
        logger.info("removed %d temporary files left by killed loads in %s", removed, root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def _stale(path: Path, pid: str | None) -> bool:
    """Remove ``path`` if its writer is gone: the pid named in it is not running (or, without
    one, the file is a day old) and nobody holds its lock. True if it was removed."""
    try:
        if pid is None:
            if time.time() - path.lstat().st_mtime < _OLD_TEMP_SECONDS:
                return False
        elif _alive(int(pid)):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer (another host) holds it
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
