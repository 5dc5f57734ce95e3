"""The safetensors format: a strict header parser, zero-copy mmap reads, and a streaming writer.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of UTF-8 JSON (padded with spaces to a multiple of 8), then the tensor data. Each
header entry has ``dtype``, ``shape`` and ``data_offsets`` relative to the data start; the
optional ``__metadata__`` is a str->str map. Data must be covered exactly.

We parse headers ourselves rather than through ``safetensors.safe_open`` because the file is
untrusted input: the reference reader accepts duplicated names and raises its own exception
type, while every problem here must become an :class:`~bigmodel.InvalidCheckpointError`
naming the file, the rule and the tensor. Reads map the file privately (copy-on-write), so a
same-dtype CPU tensor aliases the page cache and writing to it never touches the file.

Headers are parsed and checked without importing torch: dtypes are names with an element size
(:mod:`bigmodel.storage.dtypes`), resolved to torch dtypes only when a tensor is made, so
``bigmodel inspect`` and ``bigmodel verify`` start in a fraction of ``import torch``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import (
    InvalidCheckpointError,
    Problem,
    ProblemList,
    UnsupportedTensorError,
)
from bigmodel.storage.atomic import file_identity, preallocate, write_all
from bigmodel.storage.digest import DIGEST_KEY, new_hasher, placeholder
from bigmodel.storage.dtypes import ITEMSIZE, stored_dtype, stored_nbytes, torch_dtype
from bigmodel.storage.files import open_regular, watch_mapping

if TYPE_CHECKING:
    import torch

__all__ = [
    "shape_problem",
    "header_entry_bound",
    "metadata_bound",
    "RESERVED_NAMES",
    "tensor_name_problem",
    "DTYPE_FROM_NAME",
    "MAX_HEADER_SIZE",
    "MAX_TENSORS",
    "NAME_FROM_DTYPE",
    "SafetensorsFile",
    "TensorEntry",
    "header_length",
    "parse_header",
    "read_header",
    "write_safetensors",
]

#: Headers above this size are refused (the reference implementation uses the same limit).
MAX_HEADER_SIZE = 100 * 1000 * 1000
#: Files with more tensors than this are refused before their header is parsed (parsing costs
#: about 1.5 KB of memory per entry). Real checkpoints have at most a few thousand per file.
MAX_TENSORS = 100_000

_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
#: Bytes of one header entry besides its name and shape: the field names, the longest dtype name
#: and two 20-digit offsets, with room to spare.
_ENTRY_OVERHEAD = 100
#: Room for what the writer adds to ``__metadata__`` itself (the embedded digest).
_METADATA_OVERHEAD = 256


def header_entry_bound(name: str, shape: Sequence[int]) -> int:
    """An upper bound on the bytes one tensor's entry adds to a header."""
    encoded = json.dumps(name, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return len(encoded) + len(json.dumps(list(shape))) + _ENTRY_OVERHEAD


def metadata_bound(metadata: Mapping[str, str]) -> int:
    """An upper bound on the header bytes that ``metadata`` (and the writer's own additions,
    the length prefix and padding) take in a file."""
    encoded = json.dumps({"__metadata__": dict(metadata)}, ensure_ascii=False)
    return len(encoded.encode("utf-8", "surrogatepass")) + _METADATA_OVERHEAD


#: A header that is not a JSON object is parsed (to say what it is) only up to this size.
_SMALL_HEADER = 1 << 20

#: Header keys that are not tensors; no tensor may be named so.
RESERVED_NAMES = frozenset({"__metadata__"})


def tensor_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a tensor in a safetensors file, or None if it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if name in RESERVED_NAMES:
        return "is the key the safetensors format reserves for the file's metadata"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it contains a lone surrogate)"
    return None


#: safetensors dtype names whose elements are smaller than a byte; torch has no 1:1 dtype.
_SUB_BYTE = {"F4", "F6_E2M3", "F6_E3M2"}

if TYPE_CHECKING:
    #: safetensors dtype name -> torch dtype, for the dtypes this torch build has (computed,
    #: importing torch, on first use: see ``__getattr__``).
    DTYPE_FROM_NAME: dict[str, torch.dtype]
    #: torch dtype -> safetensors dtype name: the dtypes a safetensors file can store.
    NAME_FROM_DTYPE: dict[torch.dtype, str]

_TORCH_TABLES: dict[str, Any] = {}


def _torch_tables() -> dict[str, Any]:
    """``DTYPE_FROM_NAME`` and ``NAME_FROM_DTYPE``, built once (this imports torch)."""
    if not _TORCH_TABLES:
        import torch

        from_name = {
            name: getattr(torch, attr)
            for name, attr in _DTYPE_NAMES.items()
            if isinstance(getattr(torch, attr, None), torch.dtype)
        }
        _TORCH_TABLES["DTYPE_FROM_NAME"] = from_name
        _TORCH_TABLES["NAME_FROM_DTYPE"] = {dtype: name for name, dtype in from_name.items()}
    return _TORCH_TABLES


def __getattr__(name: str) -> Any:
    """PEP 562: the torch dtype tables are built on first use, so that parsing a header does
    not import torch."""
    if name in ("DTYPE_FROM_NAME", "NAME_FROM_DTYPE"):
        return _torch_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FIX_REWRITE = "re-create the file with a correct writer (bigmodel.save_checkpoint or safetensors.torch.save_file)."


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (offsets are absolute file positions).

    ``dtype_name`` is torch's name for the dtype (``"bfloat16"``); :attr:`dtype` resolves it,
    importing torch.
    """

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype_name]

    @property
    def dtype(self) -> torch.dtype:
        try:
            return torch_dtype(self.dtype_name)
        except ValueError as exc:
            raise UnsupportedTensorError(
                f"Tensor {self.name!r}: {exc} Fix: upgrade torch, or re-save the tensor in another dtype."
            ) from None


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path, fh: BinaryIO | None = None) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; raise one error listing every problem.

    Sizes are checked against the file size before anything is mapped, so a truncated file
    is reported here instead of faulting a later read.
    """
    file = str(path)
    if fh is None:
        with open_regular(path) as own:
            return read_header(path, own)
    file_size = os.fstat(fh.fileno()).st_size
    prefix = fh.read(8)
    raw = bytearray(8 + header_length(file, prefix, file_size))  # one buffer: no copy of it
    raw[:8] = prefix
    got = os.preadv(fh.fileno(), [memoryview(raw)[8:]], 8)
    return parse_header(file, raw if got == len(raw) - 8 else raw[: 8 + got], file_size)


def header_length(file: str, prefix: bytes | bytearray, file_size: int) -> int:
    """The header length that the file's first 8 bytes (``prefix``) announce, checked against
    the format's limit and the file's size before the header is read: a hostile prefix cannot
    make a reader allocate or fetch more than :data:`MAX_HEADER_SIZE` bytes. ``file`` names the
    file in errors (a path or a URL)."""
    if len(prefix) < 8 or file_size < 8:
        raise InvalidCheckpointError.one(
            file,
            "header-too-short",
            f"the file is {file_size} bytes; a safetensors file starts with an 8-byte header length.",
            hint=_FIX_REWRITE,
        )
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_SIZE:
        raise InvalidCheckpointError.one(
            file,
            "header-too-large",
            f"the header claims {header_len} bytes, above the {MAX_HEADER_SIZE}-byte limit.",
            hint=_FIX_REWRITE,
        )
    if 8 + header_len > file_size:
        raise InvalidCheckpointError.one(
            file,
            "header-past-eof",
            f"the header claims {header_len} bytes but the file has only {file_size - 8} after the length prefix (truncated file?).",
            hint="re-download or re-save the file.",
        )
    return int(header_len)


def parse_header(file: str, raw: bytes | bytearray, file_size: int) -> SafetensorsHeader:
    """Validate a safetensors header from the file's first bytes ``raw`` (the length prefix,
    then at least the whole header; bytes past it are ignored) and its size. The one parser
    of every header, local or remote (:mod:`bigmodel.storage.remote_safetensors`): the length
    prefix is checked by :func:`header_length`, a header that cannot be read at all raises at
    once, and problems in its entries and metadata are collected and raised together."""
    header_len = header_length(file, raw[:8], file_size)
    if len(raw) < 8 + header_len:
        raise InvalidCheckpointError.one(
            file,
            "header-past-eof",
            f"the header claims {header_len} bytes but only {len(raw) - 8} could be read "
            "(the file was truncated while it was read?).",
            hint="re-download or re-save the file.",
        )
    return _parse_header_json(file, raw, 8 + header_len, file_size)


def _parse_header_json(
    file: str, raw: bytes | bytearray, data_start: int, file_size: int
) -> SafetensorsHeader:
    """The header JSON ``raw[8:data_start]`` (its length already checked), parsed and
    validated without copying it."""
    _check_tensor_count(file, raw, data_start)
    obj = _decode_header(file, memoryview(raw)[8:data_start])
    if len(obj) - ("__metadata__" in obj) > MAX_TENSORS:  # one entry past: the metadata's place
        _too_many_tensors(file, MAX_TENSORS, more=True)
    problems = ProblemList(
        Problem(
            file,
            "duplicate-tensor",
            "the header names this tensor more than once; the format forbids it and readers disagree on which copy wins.",
            key=name,
            hint=_FIX_REWRITE,
        )
        for name in strict_json.duplicates(obj)
    )
    metadata = _parse_metadata(file, obj.pop("__metadata__", None), problems)

    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        entry = _parse_entry(file, name, info, data_start, problems)
        if entry is not None:
            entries[name] = entry

    if not problems:
        _check_coverage(file, entries, data_start, file_size, problems)
    if problems:
        raise InvalidCheckpointError(problems)
    return SafetensorsHeader(
        entries=entries, metadata=metadata, data_start=data_start, file_size=file_size
    )


def _check_tensor_count(file: str, raw: bytes | bytearray, end: int) -> None:
    """Refuse a header (``raw[8:end]``) with too many tensors before parsing it (parsing costs
    memory per entry)."""
    # Every entry names "data_offsets" once: an upper bound on the entry count, without parsing.
    approx_count = raw.count(b'"data_offsets"', 8, end)
    if approx_count > MAX_TENSORS:
        _too_many_tensors(file, approx_count, about=True)


def _too_many_tensors(
    file: str, count: int, *, about: bool = False, more: bool = False
) -> NoReturn:
    told = f"about {count}" if about else f"more than {count}" if more else str(count)
    raise InvalidCheckpointError.one(
        file,
        "too-many-tensors",
        f"the header describes {told} tensors, above the limit of {MAX_TENSORS} per file.",
        hint="split the checkpoint into more shards (bigmodel.save_checkpoint with a smaller max_shard_size).",
    )


def _decode_header(file: str, raw: memoryview) -> dict[str, Any]:
    """The header as a JSON object (a :class:`strict_json.JsonObject`, which remembers repeats)."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCheckpointError.one(
            file,
            "header-not-utf8",
            f"the header is not valid UTF-8 ({exc.reason} at byte {exc.start}).",
            hint=_FIX_REWRITE,
        ) from None
    try:
        if text.lstrip(" \t\n\r").startswith("{"):
            # Entry by entry: parsing stops past the entry limit, so a hostile header costs
            # memory for at most MAX_TENSORS entries, however many it holds.
            obj = strict_json.loads_object(text, MAX_TENSORS + 1)
        elif len(text) <= _SMALL_HEADER:  # say what else it is (it is refused either way)
            obj = strict_json.loads(text)
        else:
            obj = None
    except strict_json.TooManyEntriesError:
        _too_many_tensors(file, MAX_TENSORS, more=True)
    except (ValueError, RecursionError) as exc:
        raise InvalidCheckpointError.one(
            file, "header-not-json", f"the header is not valid JSON ({exc}).", hint=_FIX_REWRITE
        ) from None
    if not isinstance(obj, dict):
        raise InvalidCheckpointError.one(
            file,
            "header-not-object",
            f"the header must be a JSON object, not {type(obj).__name__}.",
            hint=_FIX_REWRITE,
        )
    return obj


def _parse_metadata(file: str, raw_meta: object, problems: list[Problem]) -> dict[str, str]:
    """The ``__metadata__`` map (empty when absent or broken, the breakage added to ``problems``)."""
    if strict_json.duplicates(raw_meta):
        problems.append(
            Problem(
                file,
                "bad-metadata",
                f"__metadata__ repeats the key(s) {strict_json.duplicates(raw_meta)}.",
                hint=_FIX_REWRITE,
            )
        )
    if raw_meta is None:
        return {}
    if not strict_json.is_str_map(raw_meta):
        problems.append(
            Problem(
                file,
                "bad-metadata",
                "__metadata__ must map strings to strings.",
                hint=_FIX_REWRITE,
            )
        )
        return {}
    return raw_meta


class _EntryRuleError(Exception):
    """The first rule a header entry breaks: its problem code, message and fix."""

    def __init__(self, code: str, message: str, hint: str = _FIX_REWRITE) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


def _parse_entry(
    file: str, name: str, info: object, data_start: int, problems: list[Problem]
) -> TensorEntry | None:
    """The entry of tensor ``name``, or None after adding the first rule it breaks to ``problems``.

    Each rule relies on the ones before it, so checking stops at the first broken one.
    """
    try:
        _name_rule(name)
        fields = _entry_object(info)
        dtype_name = _dtype_name_field(fields)
        shape = _shape_field(fields)
        offsets = _data_offsets_field(fields)
        dtype = _known_dtype(dtype_name)
        _check_span(dtype_name, dtype, shape, offsets)
        _torch_shape(shape)
    except _EntryRuleError as broken:
        problems.append(Problem(file, broken.code, broken.message, key=name, hint=broken.hint))
        return None
    begin, end = offsets
    return TensorEntry(
        name=name,
        dtype_name=dtype,
        shape=tuple(shape),
        begin=data_start + begin,
        end=data_start + end,
    )


def _name_rule(name: str) -> None:
    """The name is one a tensor can have (the writer refuses the same names)."""
    problem = tensor_name_problem(name)
    if problem is not None:
        raise _EntryRuleError("bad-name", f"the tensor name {problem}.")


def _entry_object(info: object) -> dict[str, Any]:
    """The entry is a JSON object that names each field once."""
    if not isinstance(info, dict):
        raise _EntryRuleError(
            "bad-entry",
            f"the header entry must be an object with dtype, shape and data_offsets, not {type(info).__name__}.",
        )
    if strict_json.duplicates(info):
        raise _EntryRuleError(
            "bad-entry", f"the header entry repeats the field(s) {strict_json.duplicates(info)}."
        )
    return info


def _dtype_name_field(fields: dict[str, Any]) -> str:
    """``dtype`` is a string."""
    dtype_name = fields.get("dtype")
    if not isinstance(dtype_name, str):
        raise _EntryRuleError("bad-entry", "'dtype' must be a string.")
    return dtype_name


#: torch sizes (and the products of them it computes) are signed 64-bit integers.
_MAX_DIM = 2**63 - 1


def _shape_field(fields: dict[str, Any]) -> list[int]:
    """``shape`` is a list of non-negative integers that torch can hold (below 2**63, even in a
    tensor with no elements)."""
    shape = fields.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise _EntryRuleError(
            "bad-entry", f"'shape' must be a list of non-negative integers, got {_shown(shape)}."
        )
    return shape


def _torch_shape(shape: list[int]) -> None:
    """torch can make a tensor of this shape (only in question when it has no elements: any
    other shape's bytes were checked against the file)."""
    problem = shape_problem(shape)
    if problem is not None:
        raise _EntryRuleError("bad-entry", f"'shape' {_shown(shape)} {problem}.")


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why a file may not hold a tensor of this shape (None if it may): torch computes sizes in
    64-bit integers, so the product of the non-zero dimensions stays below 2**63, even for a
    tensor with no elements. The reader and the writer apply the same rule."""
    if math.prod(d for d in shape if d) > _MAX_DIM:
        return "is too large: the product of its non-zero dimensions must be below 2**63"
    return None


def _shown(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _data_offsets_field(fields: dict[str, Any]) -> list[int]:
    """``data_offsets`` is two non-negative integers."""
    offsets = fields.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise _EntryRuleError(
            "bad-entry", f"'data_offsets' must be two non-negative integers, got {offsets!r}."
        )
    return offsets


def _known_dtype(dtype_name: str) -> str:
    """``dtype`` names a byte-sized dtype the format defines; returns torch's name for it."""
    if dtype_name in _SUB_BYTE:
        raise _EntryRuleError(
            "unsupported-dtype",
            f"dtype {dtype_name} packs elements below a byte and has no torch equivalent.",
            hint="convert this tensor to a byte-sized dtype before saving.",
        )
    dtype = _DTYPE_NAMES.get(dtype_name)
    if dtype is None:
        known = ", ".join(sorted(_DTYPE_NAMES))
        raise _EntryRuleError(
            "unknown-dtype", f"unknown dtype {dtype_name!r}; known dtypes are {known}."
        )
    return dtype


def _check_span(dtype_name: str, dtype: str, shape: list[int], offsets: list[int]) -> None:
    """``data_offsets`` end after they begin and span exactly the bytes the shape needs."""
    begin, end = offsets
    if end < begin:
        raise _EntryRuleError("bad-offsets", f"data_offsets {offsets} end before they begin.")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if expected != end - begin:
        raise _EntryRuleError(
            "size-mismatch",
            f"shape {shape} of {dtype_name} needs {expected} bytes but data_offsets {offsets} span {end - begin}.",
        )


def _check_coverage(
    file: str,
    entries: dict[str, TensorEntry],
    data_start: int,
    file_size: int,
    problems: list[Problem],
) -> None:
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            kind = (
                "overlaps the previous tensor"
                if entry.begin < position
                else f"leaves a gap of {entry.begin - position} bytes before it"
            )
            problems.append(
                Problem(
                    file,
                    "bad-offsets",
                    f"data_offsets {kind}; tensor data must be contiguous with no holes or overlap.",
                    key=entry.name,
                    hint=_FIX_REWRITE,
                )
            )
            return
        position = entry.end
    if position > file_size:
        problems.append(
            Problem(
                file,
                "truncated",
                f"tensor data ends at byte {position} but the file has {file_size} bytes (truncated file).",
                hint="re-download or re-save the file.",
            )
        )
    elif position < file_size:
        problems.append(
            Problem(
                file,
                "trailing-bytes",
                f"{file_size - position} bytes follow the last tensor; the format forbids trailing data.",
                hint=_FIX_REWRITE,
            )
        )


class SafetensorsFile:
    """A validated safetensors file with lazy, zero-copy access to each tensor.

    The file is mapped privately when it is opened (address space only: nothing is read), so
    the header and the data always come from the same file even if the path is replaced by a
    concurrent save. Tensors returned by :meth:`get_tensor` are views of that mapping
    (copy-on-write): they cost no anonymous memory until written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open_regular(path) as fh:
            header = read_header(path, fh)
            self.identity = file_identity(os.fstat(fh.fileno()))
            self._map: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._watch = watch_mapping(path, self._map)
        self.entries = header.entries
        self.metadata = header.metadata
        self.data_start = header.data_start
        self.file_size = header.file_size

    def mapping(self) -> mmap.mmap:
        """The private mapping of the file; reopened (and checked unchanged) after :meth:`close`."""
        if self._map is None:
            with open_regular(self.path) as fh:
                identity = file_identity(os.fstat(fh.fileno()))
                if identity != self.identity:
                    raise InvalidCheckpointError.one(
                        str(self.path),
                        "file-changed",
                        "the file was replaced or modified after the checkpoint was opened and closed.",
                        hint="reopen the checkpoint to read the new version.",
                    )
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                self._watch = watch_mapping(self.path, self._map)
        else:
            self._watch.check()
        return self._map

    def names(self) -> list[str]:
        return list(self.entries)

    def describe(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self.entries[name]
        return entry.dtype, entry.shape

    def describe_name(self, name: str) -> tuple[str, tuple[int, ...]]:
        """Like :meth:`describe`, with torch's name of the dtype (no torch import)."""
        entry = self.entries[name]
        return entry.dtype_name, entry.shape

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a CPU view of the mapping (a copy only if misaligned)."""
        import torch

        entry = self.entries[name]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = torch.frombuffer(  # mapping() first checks that the file did not change
            self.mapping(), dtype=torch.uint8, count=entry.nbytes, offset=entry.begin
        )
        if entry.begin % entry.itemsize:
            raw = raw.clone()  # other writers may leave tensors unaligned; views need alignment
        return raw.view(entry.dtype).view(entry.shape)

    def close(self) -> None:
        """Drop this reader's reference to the mapping; tensors already returned stay valid."""
        self._map = None
        self._watch.close()


def _as_bytes(tensor: torch.Tensor, cast: torch.dtype | None = None) -> memoryview:
    """A read-only byte view of ``tensor``'s data (cast if asked); copies only if it is not
    already a contiguous CPU tensor of the stored dtype."""
    import torch

    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    # Lazy conjugate/negative bits change the values, not the bytes: resolve them first.
    flat = flat.resolve_conj().resolve_neg()
    flat = flat.to(stored_dtype(flat, cast)).contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def header_bytes(
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None,
    cast: torch.dtype | None = None,
) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The encoded header (length prefix included) and the tensors in the order they are written.

    Tensors are ordered by descending element size, then by name, as the reference writer
    does, so that every tensor is aligned for zero-copy views.
    """
    ordered = sorted(tensors, key=lambda item: (-stored_dtype(item[1], cast).itemsize, item[0]))
    for name, _ in ordered:
        problem = tensor_name_problem(name)
        if problem is not None:
            raise UnsupportedTensorError(
                f"Tensor name {name!r} {problem}. Fix: rename the tensor before saving."
            )
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in ordered:
        size = stored_nbytes(tensor, cast)
        header[name] = {
            "dtype": _torch_tables()["NAME_FROM_DTYPE"][stored_dtype(tensor, cast)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, ordered


#: Bytes written (and hashed) at a time: small enough that the hash reads what the write just
#: brought into the CPU cache, large enough that the calls cost nothing (~250 per GB).
WRITE_CHUNK = 4 << 20


def _write_tensor(
    fh: BinaryIO, data: memoryview, hasher: Any, on_bytes: Callable[[int], object] | None
) -> None:
    """Write one tensor's bytes, hashing each chunk right after it is written."""
    for start in range(0, data.nbytes, WRITE_CHUNK):
        chunk = data[start : start + WRITE_CHUNK]
        write_all(fh, chunk)
        if hasher is not None:
            hasher.update(chunk)
    if on_bytes is not None:
        on_bytes(data.nbytes)


def write_safetensors(
    fh: BinaryIO,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    on_bytes: Callable[[int], object] | None = None,
    digest: str | None = None,
    cast: torch.dtype | None = None,
) -> tuple[int, str | None]:
    """Stream ``tensors`` into ``fh`` in safetensors format.

    Returns the bytes of tensor data and, if ``digest`` names an algorithm, the file's digest,
    computed while writing and embedded in its header (see :mod:`bigmodel.storage.digest`); ``fh`` must
    then be seekable. Each tensor is written straight from its own memory: contiguous CPU
    tensors are never copied, and any other tensor is copied one at a time, so extra memory
    is at most one tensor. ``cast`` converts floating-point tensors as they are written (one
    at a time). The caller checks dtypes against :data:`NAME_FROM_DTYPE` beforehand.

    The file's final size is known from the header, so its disk space is reserved first
    (:func:`~bigmodel.storage.atomic.preallocate`, a hint where the filesystem supports it).
    """
    meta = dict(metadata or {})
    if digest is not None:
        meta[DIGEST_KEY] = placeholder(digest)
    header, ordered = header_bytes(tensors, meta, cast)
    preallocate(fh, len(header) + sum(stored_nbytes(t, cast) for _, t in ordered))
    hasher = new_hasher(digest) if digest is not None else None
    write_all(fh, header)
    if hasher is not None:
        hasher.update(header)
    total = 0
    for _name, tensor in ordered:
        if tensor.numel():
            data = _as_bytes(tensor, cast)
            _write_tensor(fh, data, hasher, on_bytes)
            total += data.nbytes
            del data
    if hasher is None or digest is None:
        return total, None
    value = f"{digest}:{hasher.hexdigest()}"
    needle = f'"{DIGEST_KEY}":"{placeholder(digest)}"'.encode()
    end = fh.tell()
    fh.seek(header.index(needle) + len(f'"{DIGEST_KEY}":"'))
    write_all(fh, value.encode())
    fh.seek(end)
    return total, value
