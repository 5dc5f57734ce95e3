"""The validated, read-only, lazy :class:`Checkpoint` handle and its tensor descriptions.

A :class:`Checkpoint` is built by :func:`bigmodel.open_checkpoint` once every rule has been
checked; it then answers questions about tensors from headers alone and reads each tensor's
bytes only when asked (views of a private file mapping, zero copy). Describing a safetensors
checkpoint (:meth:`Checkpoint.dtype_name`, sizes, digests) does not import torch; making a
tensor or a :class:`TensorInfo` does.
"""

from __future__ import annotations

import bisect
import math
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bigmodel.checkpoint.naming import CONFIG_NAME
from bigmodel.checkpoint.verify import recorded_digests, verify_files, verify_remote
from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import InvalidCheckpointError, RemoteError
from bigmodel.foundations.types import VerifyResult
from bigmodel.storage.dtypes import ITEMSIZE
from bigmodel.storage.files import read_bounded
from bigmodel.storage.remote import RemoteFolder, RemotePath
from bigmodel.storage.remote_safetensors import RemoteSafetensorsFile
from bigmodel.storage.safetensors import SafetensorsFile

if TYPE_CHECKING:
    import torch

    from bigmodel.checkpoint.index import Reader
    from bigmodel.storage.pread import ByteRange
    from bigmodel.storage.remote_read import RemoteRange

Format = Literal["safetensors", "bin"]


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str
    #: For an alias of a tied tensor, the stored name it shares data with.
    alias_of: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSlice:
    """Lazy handle on one tensor: ``ckpt.get_slice(name)[0:128, :]`` reads only those bytes."""

    def __init__(self, checkpoint: Checkpoint, info: TensorInfo) -> None:
        self._checkpoint = checkpoint
        self.info = info

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    def get_shape(self) -> list[int]:
        """safetensors-compatible spelling of :attr:`shape`."""
        return list(self.info.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        view = self._checkpoint.get_tensor(self.info.name)[index]
        return view.contiguous()


class Checkpoint:
    """A validated, read-only checkpoint (single file or sharded, safetensors or ``.bin``).

    Use as a context manager or call :meth:`close`. Tensors returned by :meth:`get_tensor` are
    CPU views of a private file mapping: zero-copy, and writing to them never changes the file.

    A checkpoint opened from a URL (``https://``, ``s3://``...) has a :attr:`remote` folder
    and :class:`~bigmodel.storage.remote.RemotePath` locations; its tensors are read by range
    into private memory, and it has no local :attr:`directory`.
    """

    def __init__(
        self,
        *,
        path: Path | RemotePath,
        format: Format,
        index_file: Path | RemotePath | None,
        weight_map: dict[str, str],
        metadata: dict[str, Any],
        aliases: dict[str, str],
        readers: dict[str, Reader],
        remote: RemoteFolder | None = None,
    ) -> None:
        self.path = path
        #: The remote folder the files are read from (None for a local checkpoint).
        self.remote = remote
        self.format: Format = format
        self.index_file = index_file
        self.metadata = metadata
        self.aliases = aliases
        self._weight_map = weight_map
        self._readers = readers
        self._sequential = _SequentialReads(self)

    # -- structure -----------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        """True for a checkpoint read from a URL."""
        return self.remote is not None

    @property
    def location(self) -> Path | RemotePath:
        """The folder holding the files: a local path, or a URL for a remote checkpoint."""
        return self.path.parent

    @property
    def directory(self) -> Path:
        """The local folder holding the files; a remote checkpoint has none (see :attr:`location`)."""
        if isinstance(self.path, RemotePath):
            raise RemoteError(
                str(self.path),
                None,
                f"{self.path} is a remote checkpoint: it has no local folder. Fix: use "
                "Checkpoint.location, or download the checkpoint first for this operation.",
            )
        return self.path.parent

    @property
    def is_sharded(self) -> bool:
        return self.index_file is not None

    @property
    def files(self) -> list[str]:
        """Weight file names, relative to :attr:`directory`, in shard order."""
        return list(self._readers)

    def file_sizes(self) -> dict[str, int]:
        """Bytes of each weight file, as it was when opened (the path may have changed since)."""
        return {file: reader.identity[2] for file, reader in self._readers.items()}

    def keys(self) -> list[str]:
        """Every tensor name: stored tensors in file order, then aliases of tied tensors."""
        return [*self._weight_map, *self.aliases]

    def stored_keys(self) -> list[str]:
        """Names whose bytes are in the files (aliases excluded)."""
        return list(self._weight_map)

    def file_order(self) -> list[str]:
        """Stored names in the order their bytes lie on disk: files in shard order, then by
        offset within each file (``.bin`` and remote files: the index's order)."""
        files = {file: n for n, file in enumerate(self._readers)}

        def place(name: str) -> tuple[int, int]:
            reader = self._readers[self._weight_map[name]]
            offset = reader.entries[name].begin if isinstance(reader, SafetensorsFile) else 0
            return files[self._weight_map[name]], offset

        return sorted(self._weight_map, key=place)

    def keys_by_file(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {f: [] for f in self._readers}
        for name, file in self._weight_map.items():
            out[file].append(name)
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._weight_map) + len(self.aliases)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data stored (aliases counted once)."""
        return sum(self.nbytes(name) for name in self._weight_map)

    def _resolve(self, name: str) -> str:
        if name in self._weight_map:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise KeyError(
            f"{name!r} is not a tensor of the checkpoint {self.path} ({len(self)} tensors); use .keys() to list them."
        )

    def dtype_name(self, name: str) -> str:
        """torch's name of the dtype ``name`` is stored in (``"bfloat16"``), read from the
        header without importing torch for a safetensors file."""
        return self._describe_name(self._resolve(name))[0]

    def nbytes(self, name: str) -> int:
        """Bytes of ``name``'s data (from the header; no torch import for safetensors)."""
        dtype, shape = self._describe_name(self._resolve(name))
        return math.prod(shape) * ITEMSIZE[dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, from the header (no torch import for safetensors)."""
        return self._describe_name(self._resolve(name))[1]

    def _describe_name(self, stored: str) -> tuple[str, tuple[int, ...]]:
        reader = self._readers[self._weight_map[stored]]
        if isinstance(reader, SafetensorsFile):
            return reader.describe_name(stored)
        dtype, shape = reader.describe(stored)
        return str(dtype).removeprefix("torch."), shape

    def tensor_info(self, name: str) -> TensorInfo:
        stored = self._resolve(name)
        file = self._weight_map[stored]
        dtype, shape = self._readers[file].describe(stored)
        return TensorInfo(
            name=name,
            dtype=dtype,
            shape=shape,
            file=file,
            alias_of=None if stored == name else stored,
        )

    # -- data ----------------------------------------------------------------------------
    def get_tensor(self, name: str, *, readahead: bool = True) -> torch.Tensor:
        """The whole tensor on CPU, zero-copy where the file allows it.

        Reading tensors in file order is noticed: from the second tensor that follows the one
        read before it, the kernel is asked to read ahead of the reader (a window of up to
        1 GiB, renewed as the reader moves; see :class:`_SequentialReads`), so reading every
        tensor runs at the disk's rate instead of page by page. ``readahead=False`` leaves
        that to the caller (a load that announces its whole read itself).
        """
        stored = self._resolve(name)
        if readahead:
            self._sequential.saw(stored)
        return self._readers[self._weight_map[stored]].get_tensor(stored)

    def byte_range(self, name: str) -> ByteRange | None:
        """Where ``name``'s bytes are in its file, for readers that bypass the mapping (None for
        ``.bin`` files, whose layout belongs to torch's zip format)."""
        from bigmodel.storage.pread import ByteRange

        stored = self._resolve(name)
        reader = self._readers[self._weight_map[stored]]
        if not isinstance(reader, SafetensorsFile) or isinstance(reader, RemoteSafetensorsFile):
            return None
        entry = reader.entries[stored]
        return ByteRange(name, reader.path, entry.begin, entry.nbytes, entry.dtype, entry.shape)

    def remote_range(self, name: str) -> RemoteRange:
        """Where ``name``'s bytes are in its remote file (a remote checkpoint only), or in the
        local cache's copy of that file (``local``) when the cache held it."""
        from bigmodel.storage.remote_read import RemoteRange

        stored = self._resolve(name)
        file = self._weight_map[stored]
        reader = self._readers[file]
        assert isinstance(reader, SafetensorsFile), f"{self.path} is not remote"
        local = None if isinstance(reader, RemoteSafetensorsFile) else reader.path
        entry = reader.entries[stored]
        return RemoteRange(
            name, file, entry.begin, entry.nbytes, entry.dtype, entry.shape, local=local
        )

    def file_spans(self, names: Iterable[str]) -> dict[Path, list[tuple[int, int]]]:
        """Each local safetensors file's (begin, end) byte ranges holding these tensors' data
        (empty tensors, ``.bin`` files and remote files have none)."""
        spans: dict[Path, list[tuple[int, int]]] = {}
        for name in names:
            stored = self._resolve(name)
            reader = self._readers[self._weight_map[stored]]
            if isinstance(reader, SafetensorsFile) and not isinstance(
                reader, RemoteSafetensorsFile
            ):
                entry = reader.entries[stored]
                if entry.nbytes:
                    spans.setdefault(reader.path, []).append((entry.begin, entry.end))
        return spans

    def readahead(self, names: Iterable[str]) -> int:
        """Ask the kernel to start reading these tensors' bytes into the page cache, in the
        background (see :mod:`bigmodel.storage.readahead`), so later accesses find them cached
        instead of faulting page by page. Returns the bytes advised (ranges merged); 0 for
        ``.bin`` files and where the platform lacks ``posix_fadvise``.
        """
        from bigmodel.storage.readahead import readahead  # imported on use: it may need torch

        return readahead(self.file_spans(names))

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy handle: index it to read only part of the tensor."""
        return TensorSlice(self, self.tensor_info(name))

    # -- integrity -----------------------------------------------------------------------
    def digests(self) -> dict[str, str]:
        """The digest recorded for each file (by the index, or embedded in the file)."""
        return recorded_digests(self.metadata if self.is_sharded else {}, self._readers)

    def verify(
        self, *, max_workers: int | None = None, progress: bool | None = None
    ) -> VerifyResult:
        """Re-hash every file that has a recorded digest and compare (files in parallel).

        A file without a recorded digest is listed in ``unverified``; the structural checks
        done when the checkpoint was opened (sizes, offsets, keys) still apply to it. A remote
        checkpoint's files are read by range, in order, one chunk in memory.
        """
        if self.remote is not None:
            return verify_remote(self._readers, self.digests(), progress=progress)
        return verify_files(
            self.directory,
            self._readers,
            self.digests(),
            max_workers=max_workers,
            progress=progress,
        )

    def close(self) -> None:
        """Release the file mappings held by this object; tensors already returned stay valid."""
        self._sequential.stop(finish=True)
        for reader in self._readers.values():
            reader.close()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        layout = f"sharded, {len(self._readers)} files" if self.is_sharded else "single file"
        return f"Checkpoint({str(self.path)!r}, {self.format}, {layout}, {len(self)} tensors)"


class _SequentialReads:
    """Follows a :class:`Checkpoint`'s ``get_tensor`` calls. When a tensor follows the one read
    before it -- in file order (files in shard order, then offsets) or in the order of
    :meth:`Checkpoint.stored_keys` (the index's order, what ``for k in ckpt.keys()`` walks) --
    the reader is taken to read everything in that order: a
    :class:`~bigmodel.storage.readahead.Populator` makes the following tensors resident and
    mapped from a background thread, at most ``window`` bytes ahead of the reader (1 GiB, or a
    quarter of the page cache's room, so that what is read ahead is still cached when it is
    used); where the device's own readahead window is small, that window is also announced to
    the kernel (``POSIX_FADV_WILLNEED``). A read out of that order stops it. Local safetensors
    files only; a hint, never an error."""

    WINDOW = 2**30

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._orders: list[list[str]] | None = None
        self._positions: list[dict[str, int]] = []
        self._last: list[int] = []
        self._mode: int | None = None  # which order the reader follows
        self._starts: list[int] = []  # cumulative bytes before each tensor of that order
        self._announced = 0  # cumulative bytes announced so far (from the start)
        self._window = 0
        self._announce = False
        self._populator: Any = None
        self._first = 0  # the index of the populator's first tensor

    def saw(self, stored: str) -> None:
        if self._orders is None:
            self._index()
        here = [position.get(stored, -2) for position in self._positions]
        follows = [i >= 0 and i == last + 1 for i, last in zip(here, self._last, strict=True)]
        self._last = here
        if self._mode is not None and follows[self._mode]:
            self._populator.advance(here[self._mode] - self._first)
            if self._announce:
                self._announce_from(here[self._mode])
            return
        self.stop()
        if any(follows):
            self._start(follows.index(True), here[follows.index(True)])

    def _start(self, mode: int, i: int) -> None:
        from bigmodel.storage.page_cache import page_cache_room
        from bigmodel.storage.pread import mapped_read_shape
        from bigmodel.storage.readahead import Populator, needs_announcing

        assert self._orders is not None
        names = self._orders[mode]
        room = page_cache_room()
        self._window = self.WINDOW if room is None else max(64 * 2**20, min(self.WINDOW, room // 4))
        self._announce = any(map(needs_announcing, self._ckpt.file_spans(names[i : i + 1])))
        self._starts = [0]
        for name in names:
            self._starts.append(self._starts[-1] + self._ckpt.nbytes(name))
        self._mode, self._first, self._announced = mode, i, 0
        views = [self._ckpt.get_tensor(name, readahead=False) for name in names[i:]]
        shape = mapped_read_shape(self._ckpt.directory)
        self._populator = Populator(
            views,
            ahead_bytes=self._window,
            threads=shape.threads,
            chunk_bytes=shape.chunk_bytes,
        )
        # a checkpoint dropped without close() must not leave the thread waiting with its views
        weakref.finalize(self._ckpt, self._populator.finish)
        if self._announce:
            self._announce_from(i)

    def _announce_from(self, i: int) -> None:
        assert self._orders is not None and self._mode is not None
        names = self._orders[self._mode]
        here = self._starts[i]
        if here + self._window // 2 < self._announced:
            return
        end = bisect.bisect_right(self._starts, here + self._window)
        first = bisect.bisect_right(self._starts, max(self._announced, here)) - 1
        self._ckpt.readahead(names[max(first, i) : end])
        self._announced = self._starts[min(end, len(names))]

    def stop(self, *, finish: bool = False) -> None:
        """Stop reading ahead: at once (a read out of order), or once the tensors already
        asked for are read (``finish``: the checkpoint was closed, its tensors are in use)."""
        if self._populator is not None:
            if finish:
                self._populator.finish()
            else:
                self._populator.cancel(wait=False)
            self._populator = None
        self._mode = None

    def _index(self) -> None:
        local = all(
            isinstance(r, SafetensorsFile) and not isinstance(r, RemoteSafetensorsFile)
            for r in self._ckpt._readers.values()
        )
        by_file = self._ckpt.file_order() if local else []
        by_key = self._ckpt.stored_keys() if local else []
        self._orders = [by_file] if by_key == by_file else [by_file, by_key]
        self._positions = [{name: i for i, name in enumerate(o)} for o in self._orders]
        self._last = [-2] * len(self._orders)


def first_floating_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored (in file order), as transformers'
    ``dtype="auto"`` reads a checkpoint; None when no tensor is floating-point."""
    for name in ckpt.stored_keys():
        dtype = ckpt.tensor_info(name).dtype
        if dtype.is_floating_point:
            return dtype
    return None


def config_dtype(directory: Path | RemoteFolder) -> torch.dtype | None:
    """The floating-point dtype a Hugging Face ``config.json`` beside the weights records
    (``dtype``, or the older ``torch_dtype``); None when there is no such file or field. The
    file is untrusted: read bounded, and anything unreadable counts as no record. ``directory``
    is a local folder or a remote one (a checkpoint's :attr:`Checkpoint.remote`)."""
    from bigmodel.foundations.dtypes import parse_dtype

    try:
        raw = read_config(directory)
        if raw is None:
            return None
        config = strict_json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, OSError):
        return None
    if not isinstance(config, dict):
        return None
    for field in ("dtype", "torch_dtype"):
        value = config.get(field)
        if isinstance(value, str):
            try:
                return parse_dtype(value)
            except ValueError:
                return None
    return None


_MAX_CONFIG = 16 * 2**20


def read_config(
    directory: Path | RemoteFolder, *, limit: int = _MAX_CONFIG, hint: str = ""
) -> bytes | None:
    """The bytes of ``config.json`` in ``directory`` (a local folder or a remote one), or None
    when there is none. A file above ``limit`` bytes raises
    :class:`~bigmodel.InvalidCheckpointError` (``config-too-large``, with ``hint``); a local
    one that is not a regular file is refused by :func:`~bigmodel.storage.files.read_bounded`."""
    if isinstance(directory, RemoteFolder):
        size = directory.size(CONFIG_NAME)
        if size is None:
            return None
        if size > limit:
            raise InvalidCheckpointError.one(
                str(directory.path(CONFIG_NAME)),
                "config-too-large",
                f"config.json is {size} bytes, above the {limit}-byte limit.",
                hint=hint,
            )
        return bytes(directory.read(CONFIG_NAME, 0, size))
    path = directory / CONFIG_NAME
    if not os.path.lexists(path):  # a config.json of any kind is read (or refused)
        return None
    return read_bounded(path, limit, code="config-too-large", what="config.json", hint=hint)
