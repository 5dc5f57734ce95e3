"""A safetensors file under a URL: its header read by byte range and checked by the same rules
as a local file's, its tensors read by range into private memory.

The header is fetched with one request in the common case (the first ``_FIRST_READ`` bytes,
then the rest of the header if it is longer), refused before it is fetched when its length
prefix breaks the format's limits, and parsed by :mod:`bigmodel.storage.safetensors`'s own
parser: a remote header is untrusted input exactly as a local one. The size the server
announces stands for the file size, so a wrong ``Content-Length`` shows up as a truncated file
or trailing bytes. Nothing is mapped and nothing is written to disk; loads read tensors in
bulk through :mod:`bigmodel.storage.remote_read`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from bigmodel.foundations.errors import RemoteError
from bigmodel.storage.digest import DIGEST_KEY, hash_header_masked, new_hasher, split_digest
from bigmodel.storage.remote import RemoteFolder, RemotePath
from bigmodel.storage.safetensors import (
    SafetensorsFile,
    SafetensorsHeader,
    header_length,
    parse_header,
)

if TYPE_CHECKING:
    import torch

__all__ = ["RemoteSafetensorsFile"]

#: Bytes fetched by the first request: the length prefix and, for most files, the whole header.
_FIRST_READ = 1 << 20
#: Bytes hashed per request when a file is verified.
_HASH_CHUNK = 16 * 2**20


class RemoteSafetensorsFile(SafetensorsFile):
    """A validated safetensors file under ``folder``. It answers what a local
    :class:`~bigmodel.storage.safetensors.SafetensorsFile` answers from its header (entries,
    metadata, names, dtypes), so every check written for local shards applies to it; its
    ``path`` is a :class:`~bigmodel.storage.remote.RemotePath` and it has no mapping: tensors
    are read by range."""

    def __init__(
        self, folder: RemoteFolder, name: str, size: int, digest: str | None = None
    ) -> None:
        # The local constructor opens and maps a file: nothing of it applies here.
        self.folder = folder
        self.name = name
        if folder.cache is not None:  # what is read from here on is kept (``digest`` checks it)
            folder.cache.expect(name, size, digest)
        self.path = folder.path(name)  # type: ignore[assignment]  # a URL, shown like a path
        header = _read_header(folder, name, size)
        self.entries = header.entries
        self.metadata = header.metadata
        self.data_start = header.data_start
        self.file_size = size
        #: (device, inode, size, mtime) for a local file; only the size is known here.
        self.identity = (0, 0, size, 0)
        self._map = None

    @property
    def remote_path(self) -> RemotePath:
        return self.folder.path(self.name)

    def mapping(self) -> NoReturn:
        raise RemoteError(
            str(self.remote_path),
            None,
            f"{self.remote_path} is a remote file: it has no file mapping. Fix: read its tensors "
            "with get_tensor (or load the checkpoint), which read by range.",
        )

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read by range into private CPU memory (one request)."""
        import torch

        entry = self.entries[name]
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            out.numpy()[:] = self.folder.read(self.name, entry.begin, entry.end)
        return out.view(entry.dtype).view(entry.shape)

    def digest(self, expected: str) -> str | None:
        """The digest of the whole file with the algorithm of ``expected``, read by range in
        order (one chunk in memory); the embedded digest is hashed as zeros, as when it was
        written (see :func:`bigmodel.storage.digest.buffer_digest`). None when ``expected`` is
        malformed or an embedded one does not occur exactly once in the header."""
        parsed = split_digest(expected)
        if parsed is None:
            return None
        algorithm = parsed[0]
        hasher = new_hasher(algorithm)
        start = 0
        if self.metadata.get(DIGEST_KEY) == expected:
            header = bytes(self.folder.read(self.name, 0, self.data_start))
            masked = hash_header_masked(hasher, header, expected)
            if masked is None:
                return None
            start = masked
        for offset in range(start, self.file_size, _HASH_CHUNK):
            hasher.update(
                self.folder.read(self.name, offset, min(offset + _HASH_CHUNK, self.file_size))
            )
        return f"{algorithm}:{hasher.hexdigest()}"

    def close(self) -> None:
        """Nothing is held open between requests; tensors already returned stay valid."""
        self._map = None


def _read_header(folder: RemoteFolder, name: str, size: int) -> SafetensorsHeader:
    """Fetch the header (one request when it fits in the first read) and parse it with the
    local parser: the length prefix is checked before the rest of a long header is fetched."""
    file = str(folder.path(name))
    first = bytes(folder.read(name, 0, min(size, _FIRST_READ)))
    need = 8 + header_length(file, first[:8], size)
    if len(first) < need:
        first += bytes(folder.read(name, len(first), need))
    return parse_header(file, first, size)
