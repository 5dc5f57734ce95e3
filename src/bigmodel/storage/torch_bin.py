"""The legacy pickled format (``pytorch_model.bin``), read only through ``weights_only=True``.

Files are opened with ``torch.load(mmap=True, weights_only=True)``: tensors are views of a
private mapping (no anonymous memory) and the unpickler refuses anything but tensors and
plain containers, so a hostile file cannot run code. Plain unpickling is never used.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from bigmodel.foundations.errors import InvalidCheckpointError, UnsafeCheckpointError
from bigmodel.storage.atomic import file_identity
from bigmodel.storage.digest import HashingWriter, new_hasher
from bigmodel.storage.dtypes import stored_dtype
from bigmodel.storage.files import open_regular, watch_open

__all__ = ["BinFile", "load_bin", "write_bin"]


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.bin`` state dict lazily and safely; raise a typed error naming the file otherwise."""
    file = str(path)
    with open_regular(path) as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        if magic[:1] == b"\x80":  # a pickle protocol marker: pre-1.6 torch.save or a bare pickle
            raise InvalidCheckpointError.one(
                file,
                "legacy-bin-format",
                "this is a bare pickle (the pre-1.6 torch.save format), not a torch zip archive; it cannot be memory-mapped and bigmodel does not unpickle it.",
                hint="if you trust the file, load it with torch.load and re-save it with bigmodel.save_checkpoint (safetensors).",
            )
        raise InvalidCheckpointError.one(
            file,
            "unreadable-bin",
            f"the file is not a torch zip archive (it starts with {magic!r}{', it is empty' if not magic else ''}).",
            hint="the file is probably truncated or corrupt; re-download or re-save it.",
        )
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError.one(
            file,
            "unsafe-pickle",
            f"torch.load(weights_only=True) refuses this pickle: {reason}",
            hint="only load .bin files you trust through torch directly, then save them again with bigmodel.save_checkpoint (safetensors).",
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        text = str(exc).strip()
        raise InvalidCheckpointError.one(
            file,
            "unreadable-bin",
            f"torch.load could not read the file ({type(exc).__name__}: {text.splitlines()[0] if text else ''}).",
            hint="the file is probably truncated or corrupt; re-download or re-save it.",
        ) from None
    if not isinstance(obj, Mapping):
        raise InvalidCheckpointError.one(
            file,
            "bad-bin-content",
            f"the file holds a {type(obj).__name__}, not a state dict.",
            hint="save model.state_dict(), not the model or another object.",
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InvalidCheckpointError.one(
            file,
            "bad-bin-content",
            f"the state dict has {len(bad)} entries that are not str -> Tensor (first: {bad[0]!r}).",
            hint="save a flat state dict of tensors.",
        )
    return dict(obj)


class BinFile:
    """A validated ``.bin`` state dict; tensors are views of torch's private file mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        with open_regular(path) as fh:
            self._watch = watch_open(path, fh)
            self.identity = file_identity(os.fstat(fh.fileno()))
            self.tensors = load_bin(path)

    def names(self) -> list[str]:
        return list(self.tensors)

    def describe(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self.tensors[name]
        return tensor.dtype, tuple(tensor.shape)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor (a view of torch's mapping), once the file is checked unchanged."""
        self._watch.check()
        return self.tensors[name]

    def close(self) -> None:
        """Stop watching the file; torch's mapping lives as long as the tensors."""
        self._watch.close()


def write_bin(
    fh: BinaryIO,
    tensors: Mapping[str, torch.Tensor],
    digest: str | None = None,
    cast: torch.dtype | None = None,
) -> tuple[int, str | None]:
    """``torch.save`` a flat state dict into ``fh``; return the bytes of tensor data and,
    if ``digest`` names an algorithm, the digest of the whole file, computed while writing.

    A tensor that is a view into a larger storage is cloned first, because ``torch.save``
    writes whole storages: without it, a small view would drag its base tensor into the file.
    """
    out: dict[str, torch.Tensor] = {}
    dtype_of_storage: dict[int, torch.dtype] = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        # Lazy conjugate/negative bits change the values, not the bytes: resolve them first.
        t = t.resolve_conj().resolve_neg().to(stored_dtype(t, cast))
        storage = t.untyped_storage()
        seen = dtype_of_storage.setdefault(storage.data_ptr(), t.dtype) if t.numel() else t.dtype
        # torch.save refuses two dtypes over one storage: a view as another dtype is cloned.
        if storage.nbytes() != t.numel() * t.element_size() or seen != t.dtype:
            t = t.clone()
        out[name] = t
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    if digest is None:
        torch.save(out, fh)
        return nbytes, None
    writer = HashingWriter(fh, new_hasher(digest))
    torch.save(out, writer)  # type: ignore[arg-type]
    return nbytes, f"{digest}:{writer.hasher.hexdigest()}"
