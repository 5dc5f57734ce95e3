"""Shard digests: computed while writing, checked on demand.

A digest is written as ``"<algorithm>:<hex>"``. The default, ``xxh3_128``, hashes at ~20 GB/s
per core (it detects corruption, not tampering: whoever can rewrite a shard can rewrite the
index); ``sha256`` is available where a cryptographic hash is wanted.

A safetensors file carries its own digest in ``__metadata__["bigmodel_digest"]``. It covers the
whole file, header included, with the digest's hex digits read as zeros: the writer reserves
the value with zeros, streams the file through the hash, then overwrites the zeros in place.
The index repeats every file's digest in ``metadata["bigmodel_digests"]`` (the only place a
``.bin`` shard's digest can live, and the way to tell that a shard belongs to this index).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import xxhash

from bigmodel.storage.atomic import file_identity
from bigmodel.storage.files import open_regular

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DIGESTS_KEY",
    "DIGEST_KEY",
    "Hasher",
    "HashingWriter",
    "buffer_digest",
    "hash_header_masked",
    "path_digest",
    "new_hasher",
    "placeholder",
    "split_digest",
]

DIGEST_KEY = "bigmodel_digest"
DIGESTS_KEY = "bigmodel_digests"
DEFAULT_ALGORITHM = "xxh3_128"


class Hasher(Protocol):
    def update(self, data: bytes | memoryview | mmap.mmap, /) -> None: ...

    def hexdigest(self) -> str: ...


ALGORITHMS: dict[str, Callable[[], Hasher]] = {
    "xxh3_128": xxhash.xxh3_128,
    "sha256": hashlib.sha256,
}
_HEX_LENGTH = {"xxh3_128": 32, "sha256": 64}


def new_hasher(algorithm: str) -> Hasher:
    try:
        return ALGORITHMS[algorithm]()
    except KeyError:
        raise ValueError(
            f"Unknown digest algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)} or None."
        ) from None


def placeholder(algorithm: str) -> str:
    """The value reserved in a header before the digest is known (same length as the digest)."""
    new_hasher(algorithm)
    return f"{algorithm}:{'0' * _HEX_LENGTH[algorithm]}"


def split_digest(value: str) -> tuple[str, str] | None:
    """``(algorithm, hex)`` of a well-formed digest string, else None."""
    algorithm, sep, hexdigest = value.partition(":")
    if not sep or algorithm not in _HEX_LENGTH or len(hexdigest) != _HEX_LENGTH[algorithm]:
        return None
    if any(c not in "0123456789abcdef" for c in hexdigest):
        return None
    return algorithm, hexdigest


class HashingWriter:
    """A write-only file object that hashes what it writes (for ``torch.save``)."""

    def __init__(self, fh: BinaryIO, hasher: Hasher) -> None:
        self._fh = fh
        self.hasher = hasher

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        view = memoryview(data).cast("B")
        while view:
            written = self._fh.write(view)
            view = view[written or 0 :]
        return len(data) if isinstance(data, bytes) else memoryview(data).nbytes

    def flush(self) -> None:
        self._fh.flush()


_CHUNK = 64 << 20


def hash_header_masked(hasher: Hasher, header: bytes, expected: str) -> int | None:
    """Feed ``hasher`` a safetensors header that embeds the digest ``expected``, with that one
    occurrence hashed as zeros (as it was when written); return the offset hashing goes on
    from, or None when the digest does not occur exactly once in the header (or is malformed).
    The one rule shared by every way of re-hashing a file (mapped, or read by range)."""
    parsed = split_digest(expected)
    if parsed is None:
        return None
    hexdigest = parsed[1]
    needle = f'"{DIGEST_KEY}":"{expected}"'.encode()
    if header.count(needle) != 1:
        return None
    at = header.index(needle) + len(needle) - 1 - len(hexdigest)
    hasher.update(header[:at])
    hasher.update(b"0" * len(hexdigest))
    return at + len(hexdigest)


def buffer_digest(buffer: mmap.mmap, expected: str, *, embedded: bool) -> str | None:
    """Recompute the digest of a whole mapped file with the algorithm of ``expected``.

    With ``embedded=True`` the file carries ``expected`` itself (in its safetensors header);
    that one occurrence is hashed as zeros, as it was when written. Returns None when the
    file cannot be hashed that way (the digest does not occur exactly once in its header).
    The hash runs outside the GIL, so files can be checked in parallel threads.
    """
    parsed = split_digest(expected)
    if parsed is None:
        return None
    algorithm = parsed[0]
    hasher = new_hasher(algorithm)
    size = len(buffer)
    start = 0
    if embedded:
        header_end = 8 + int.from_bytes(buffer[:8], "little") if size >= 8 else 0
        masked = hash_header_masked(hasher, buffer[:header_end], expected)
        if masked is None:
            return None
        start = masked
    view = memoryview(buffer)
    try:
        for offset in range(start, size, _CHUNK):
            hasher.update(view[offset : min(offset + _CHUNK, size)])
    finally:
        view.release()
    return f"{algorithm}:{hasher.hexdigest()}"


def path_digest(
    path: Path, expected: str, identity: tuple[int, int, int, int] | None = None
) -> str | None:
    """:func:`buffer_digest` of a file without an embedded digest (a ``.bin`` shard).

    With ``identity`` (see ``file_identity``), raise ``FileExistsError`` if ``path`` is no
    longer the file that was opened.
    """
    with open_regular(path) as fh:
        st = os.fstat(fh.fileno())
        if identity is not None and file_identity(st) != identity:
            raise FileExistsError(f"{path} was replaced after it was opened")
        if st.st_size == 0:
            parsed = split_digest(expected)
            return None if parsed is None else f"{parsed[0]}:{new_hasher(parsed[0]).hexdigest()}"
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return buffer_digest(mm, expected, embedded=False)
