"""What a checkpoint is: discovery in a folder, the index, validation, lazy per-tensor access.

:func:`open_checkpoint` accepts a folder, an index file or a single weights file and returns
a read-only :class:`Checkpoint`. The index and every header are untrusted input: they are
validated when the checkpoint is opened and every problem is reported in one
:class:`~bigmodel.InvalidCheckpointError`. Tensors are then read lazily, one at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bigmodel.checkpoint.index import (
    ALIASES_KEY,
    INDEX_FIX,
    MAX_INDEX_SIZE,
    Reader,
    check_recorded_digests,
    parse_aliases,
    read_index,
    unsafe_shard_name,
)
from bigmodel.checkpoint.sharding import (
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    Problem,
    UnsafeCheckpointError,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import VerifyResult
from bigmodel.storage.atomic import file_identity
from bigmodel.storage.digest import DIGEST_KEY, DIGESTS_KEY, buffer_digest, path_digest
from bigmodel.storage.pread import ByteRange
from bigmodel.storage.safetensors import SafetensorsFile
from bigmodel.storage.torch_bin import BinFile

__all__ = [
    "ALIASES_KEY",
    "MAX_INDEX_SIZE",
    "Checkpoint",
    "TensorInfo",
    "TensorSlice",
    "open_checkpoint",
]

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


def _advise_willneed(spans: dict[Path, list[tuple[int, int]]]) -> None:
    """Start kernel readahead of each (begin, end) span; hints only, so errors are ignored."""
    for path, ranges in spans.items():
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                for begin, end in ranges:
                    os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


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
    """

    def __init__(
        self,
        *,
        path: Path,
        format: Format,
        index_file: Path | None,
        weight_map: dict[str, str],
        metadata: dict[str, Any],
        aliases: dict[str, str],
        readers: dict[str, Reader],
    ) -> None:
        self.path = path
        self.directory = path.parent
        self.format: Format = format
        self.index_file = index_file
        self.metadata = metadata
        self.aliases = aliases
        self._weight_map = weight_map
        self._readers = readers

    # -- structure -----------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        return self.index_file is not None

    @property
    def files(self) -> list[str]:
        """Weight file names, relative to :attr:`directory`, in shard order."""
        return list(self._readers)

    def keys(self) -> list[str]:
        """Every tensor name: stored tensors in file order, then aliases of tied tensors."""
        return [*self._weight_map, *self.aliases]

    def stored_keys(self) -> list[str]:
        """Names whose bytes are in the files (aliases excluded)."""
        return list(self._weight_map)

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
        return sum(self.tensor_info(name).nbytes for name in self._weight_map)

    def _resolve(self, name: str) -> str:
        if name in self._weight_map:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise KeyError(
            f"{name!r} is not a tensor of the checkpoint {self.path} ({len(self)} tensors); use .keys() to list them."
        )

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
    def get_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor on CPU, zero-copy where the file allows it."""
        stored = self._resolve(name)
        return self._readers[self._weight_map[stored]].get_tensor(stored)

    def byte_range(self, name: str) -> ByteRange | None:
        """Where ``name``'s bytes are in its file, for readers that bypass the mapping (None for
        ``.bin`` files, whose layout belongs to torch's zip format)."""
        stored = self._resolve(name)
        reader = self._readers[self._weight_map[stored]]
        if not isinstance(reader, SafetensorsFile):
            return None
        entry = reader.entries[stored]
        return ByteRange(name, reader.path, entry.begin, entry.nbytes, entry.dtype, entry.shape)

    def prefetch(self, names: Iterable[str]) -> int:
        """Ask the kernel to start reading these tensors' bytes into the page cache
        (``posix_fadvise(WILLNEED)`` on merged ranges, issued from a background thread), so
        later accesses find them cached instead of faulting page by page. Returns the bytes
        advised at once; a no-op where the platform lacks ``posix_fadvise``.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:  # pragma: no cover - not Linux/BSD
            return 0
        spans: dict[Path, list[tuple[int, int]]] = {}
        for name in names:
            stored = self._resolve(name)
            reader = self._readers[self._weight_map[stored]]
            if isinstance(reader, SafetensorsFile):
                entry = reader.entries[stored]
                if entry.nbytes:
                    spans.setdefault(reader.path, []).append((entry.begin, entry.end))
        total = 0
        merged: dict[Path, list[tuple[int, int]]] = {}
        for path, ranges in spans.items():
            out: list[tuple[int, int]] = []
            for begin, end in sorted(ranges):
                if out and begin <= out[-1][1]:
                    out[-1] = (out[-1][0], max(out[-1][1], end))
                else:
                    out.append((begin, end))
            merged[path] = out
            total += sum(end - begin for begin, end in out)
        if merged:
            threading.Thread(
                target=_advise_willneed, args=(merged,), name="bigmodel-readahead", daemon=True
            ).start()
        return total

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy handle: index it to read only part of the tensor."""
        return TensorSlice(self, self.tensor_info(name))

    # -- integrity -----------------------------------------------------------------------
    def digests(self) -> dict[str, str]:
        """The digest recorded for each file (by the index, or embedded in the file)."""
        recorded = self.metadata.get(DIGESTS_KEY) if self.is_sharded else None
        out = dict(recorded) if isinstance(recorded, dict) else {}
        for file, reader in self._readers.items():
            embedded = reader.metadata.get(DIGEST_KEY)
            if isinstance(embedded, str) and file not in out:
                out[file] = embedded
        return out

    def verify(
        self, *, max_workers: int | None = None, progress: bool | None = None
    ) -> VerifyResult:
        """Re-hash every file that has a recorded digest and compare (files in parallel).

        A file without a recorded digest is listed in ``unverified``; the structural checks
        done when the checkpoint was opened (sizes, offsets, keys) still apply to it.
        """
        expected = self.digests()
        problems: list[Problem] = []
        verified: list[str] = []

        def check(file: str) -> Problem | None:
            reader = self._readers[file]
            path = str(self.directory / file)
            try:
                if isinstance(reader, SafetensorsFile):
                    embedded = reader.metadata.get(DIGEST_KEY) == expected[file]
                    actual = buffer_digest(reader.mapping(), expected[file], embedded=embedded)
                else:
                    actual = path_digest(self.directory / file, expected[file], reader.identity)
            except FileExistsError:
                return Problem(
                    path,
                    "file-changed",
                    "the file was replaced after the checkpoint was opened.",
                    hint="reopen the checkpoint and verify again.",
                )
            if actual is None:
                return Problem(
                    path,
                    "digest-unverifiable",
                    f"the recorded digest {expected[file]!r} is malformed or cannot be located in the file.",
                    hint="re-save the checkpoint to record fresh digests.",
                )
            if actual != expected[file]:
                return Problem(
                    path,
                    "digest-mismatch",
                    f"the file's contents do not match the digest recorded when it was written (expected {expected[file]}, got {actual}): it is corrupt.",
                    hint="re-download or re-save this file.",
                )
            return None

        files = [f for f in self._readers if f in expected]
        workers = max_workers or min(4, os.cpu_count() or 1)
        total = sum((self.directory / f).stat().st_size for f in files)
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            progress_bar(
                total=total, desc=f"Verifying {self.directory.name}", progress=progress
            ) as bar,
        ):
            for file, problem in zip(files, pool.map(check, files), strict=True):
                bar.update((self.directory / file).stat().st_size)
                if problem is None:
                    verified.append(file)
                else:
                    problems.append(problem)
        unverified = [f for f in self._readers if f not in expected]
        return VerifyResult(verified=verified, unverified=unverified, problems=problems)

    def close(self) -> None:
        """Release the file mappings held by this object; tensors already returned stay valid."""
        for reader in self._readers.values():
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        layout = f"sharded, {len(self._readers)} files" if self.is_sharded else "single file"
        return f"Checkpoint({str(self.path)!r}, {self.format}, {layout}, {len(self)} tensors)"


# -- discovery ---------------------------------------------------------------------------
def _candidates(prefer_safe: bool) -> list[str]:
    safe = [SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME]
    legacy = [WEIGHTS_INDEX_NAME, WEIGHTS_NAME]
    return safe + legacy if prefer_safe else legacy + safe


def discover(path: str | os.PathLike[str], *, prefer_safe: bool = True) -> Path:
    """The file that defines the checkpoint at ``path`` (an index or a single weights file).

    In a folder the order is: safetensors index, ``model.safetensors``, ``.bin`` index,
    ``pytorch_model.bin`` (the ``.bin`` pair first when ``prefer_safe=False``).
    """
    p = Path(path)
    if p.is_dir():
        present: list[str] = []
        for attempt in range(_OPEN_ATTEMPTS):
            # One listing, not a stat per candidate: a save that replaces a single file with a
            # sharded checkpoint (or the reverse) between two stats would hide both layouts.
            names = set(os.listdir(p))
            for name in _candidates(prefer_safe):
                if name in names and (p / name).is_file():
                    return p / name
            present = sorted(n for n in names if n.endswith((".safetensors", ".bin", ".json")))
            if not any(n.endswith((".safetensors", ".bin")) for n in present):
                break  # no weight files at all (say, only config.json): no save is in flight
            time.sleep(0.01 * (attempt + 1))  # weight files but no entry point: a save in flight?
        raise CheckpointNotFoundError(
            f"No checkpoint in folder {p}: looked for {', '.join(_candidates(prefer_safe))}"
            + (
                f"; found only {', '.join(present[:10])}"
                if present
                else "; the folder has no weight files"
            )
            + ". Fix: pass the folder a checkpoint was saved into, or the path of a weights or index file."
        )
    if not p.exists():
        raise CheckpointNotFoundError(
            f"No checkpoint at {p}: the path does not exist. Fix: check the path."
        )
    return p


def _file_format(name: str) -> Format | None:
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".bin", ".pt", ".pth")):
        return "bin"
    return None


#: Problems a concurrent save can cause while a reader opens the folder; opening is retried.
_TRANSIENT = frozenset({"missing-shard", "shard-not-from-this-index", "file-changed"})


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        return file_identity(path.stat())
    except FileNotFoundError:
        return None


def open_checkpoint(
    path: str | os.PathLike[str], *, prefer_safe: bool = True, verify: bool = False
) -> Checkpoint:
    """Open and validate the checkpoint at ``path`` (folder, index file or weights file).

    Every structural rule is checked (see :class:`~bigmodel.InvalidCheckpointError`). If a save
    into the folder replaces the checkpoint while it is being opened, the open starts over, so
    the result is one complete version. With ``verify=True`` every file that has a recorded
    digest is also re-hashed (:meth:`Checkpoint.verify`) and a mismatch raises.
    """
    for attempt in range(_OPEN_ATTEMPTS):
        target = discover(path, prefer_safe=prefer_safe)
        before = _identity(target)
        try:
            ckpt = _open_target(target)
        except (InvalidCheckpointError, FileNotFoundError) as exc:
            changed = (
                _identity(target) != before or discover(path, prefer_safe=prefer_safe) != target
            )
            transient = isinstance(exc, FileNotFoundError) or any(
                p.code in _TRANSIENT for p in exc.problems
            )
            if changed and transient and attempt + 1 < _OPEN_ATTEMPTS:
                logger.info(
                    "%s changed while it was being opened (a concurrent save?); opening it again",
                    target,
                )
                time.sleep(0.01 * (attempt + 1))
                continue
            raise
        if verify:
            result = ckpt.verify()
            if result.problems:
                _raise_problems(result.problems)
        return ckpt
    raise AssertionError("unreachable")  # pragma: no cover


_OPEN_ATTEMPTS = 5


def _open_target(target: Path) -> Checkpoint:
    name = target.name
    if name.endswith(".index.json"):
        return _open_sharded(target)
    fmt = _file_format(name)
    if fmt is None:
        raise InvalidCheckpointError.one(
            str(target),
            "unknown-format",
            "not a recognised checkpoint file; expected *.safetensors, *.bin, *.pt, *.pth or *.index.json.",
            hint="pass the folder or the index file of the checkpoint.",
        )
    return _open_single(target, fmt)


def _open_single(target: Path, fmt: Format) -> Checkpoint:
    problems: list[Problem] = []
    reader: Reader = SafetensorsFile(target) if fmt == "safetensors" else BinFile(target)
    metadata: dict[str, Any] = dict(reader.metadata)
    weight_map = dict.fromkeys(reader.names(), target.name)
    aliases = parse_aliases(str(target), metadata.get(ALIASES_KEY), weight_map, problems)
    if problems:
        raise InvalidCheckpointError(problems)
    return Checkpoint(
        path=target,
        format=fmt,
        index_file=None,
        weight_map=weight_map,
        metadata=metadata,
        aliases=aliases,
        readers={target.name: reader},
    )


def _raise_problems(problems: list[Problem]) -> None:
    """Raise one error for every problem; an unsafe pickle anywhere keeps its specific type."""
    if problems:
        unsafe = any(p.code == "unsafe-pickle" for p in problems)
        raise (UnsafeCheckpointError if unsafe else InvalidCheckpointError)(problems)


def _open_sharded(index: Path) -> Checkpoint:
    file = str(index)
    fmt: Format = "bin" if index.name.endswith(".bin.index.json") else "safetensors"
    weight_map, metadata, problems = read_index(index)
    directory = index.parent

    shards: list[str] = []
    bad_shards: set[str] = set()
    for key, shard in weight_map.items():
        if shard in shards or shard in bad_shards:
            continue
        reason = unsafe_shard_name(shard)
        if reason is None and _file_format(shard) != fmt:
            reason = f"is not a {fmt} file, but the index is a {fmt} index"
        if reason is None and not (directory / shard).is_file():
            problems.append(
                Problem(
                    file,
                    "missing-shard",
                    f"the index names shard {shard!r}, which is not in {directory}.",
                    key=key,
                    hint="copy the missing shard into the folder or re-save the checkpoint.",
                )
            )
            bad_shards.add(shard)
        elif reason is not None:
            problems.append(
                Problem(
                    file,
                    "unsafe-shard-name",
                    f"shard name {shard!r} {reason}.",
                    key=key,
                    hint=INDEX_FIX,
                )
            )
            bad_shards.add(shard)
        else:
            shards.append(shard)

    readers: dict[str, Reader] = {}
    holder: dict[str, str] = {}
    for shard in shards:
        try:
            reader: Reader = (
                SafetensorsFile(directory / shard)
                if fmt == "safetensors"
                else BinFile(directory / shard)
            )
        except InvalidCheckpointError as exc:
            problems.extend(exc.problems)
            continue
        readers[shard] = reader
        for name in reader.names():
            if name in holder:
                problems.append(
                    Problem(
                        file,
                        "duplicate-key",
                        f"the tensor is stored in both {holder[name]!r} and {shard!r}; which copy wins is undefined.",
                        key=name,
                        hint=INDEX_FIX,
                    )
                )
                continue
            holder[name] = shard
            if weight_map.get(name) != shard:
                where = (
                    f"is not listed in the index {index.name}"
                    if name not in weight_map
                    else f"is listed in the index {index.name} under {weight_map[name]!r}"
                )
                problems.append(
                    Problem(
                        str(directory / shard),
                        "shard-key-not-in-index",
                        f"the shard holds this tensor, which {where}.",
                        key=name,
                        hint=INDEX_FIX,
                    )
                )
    for key, shard in weight_map.items():
        if shard in readers and holder.get(key) != shard:
            problems.append(
                Problem(
                    file,
                    "index-key-not-in-shard",
                    f"the index maps this key to {shard!r}, whose header does not contain it.",
                    key=key,
                    hint=INDEX_FIX,
                )
            )

    problems.extend(check_recorded_digests(file, metadata.get(DIGESTS_KEY), readers))
    aliases = parse_aliases(file, metadata.get(ALIASES_KEY), weight_map, problems)
    _raise_problems(problems)
    # Files in name order: shard order for Hugging Face names.
    ordered = {shard: readers[shard] for shard in sorted(set(weight_map.values()))}
    return Checkpoint(
        path=index,
        format=fmt,
        index_file=index,
        weight_map=weight_map,
        metadata=metadata,
        aliases=aliases,
        readers=ordered,
    )
