"""The legacy pickled format (``pytorch_model.bin``), read only through ``weights_only=True``.

Files are opened with ``torch.load(mmap=True, weights_only=True)``: tensors are views of a
private mapping (no anonymous memory) and the unpickler refuses anything but tensors and
plain containers, so a hostile file cannot run code. Plain unpickling is never used.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .._errors import InvalidCheckpointError, UnsafeCheckpointError

__all__ = ["load_bin", "write_bin"]


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.bin`` state dict lazily and safely; raise a typed error naming the file otherwise."""
    file = str(path)
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
        text = str(exc)
        if "zipfile" in text.lower() or "_use_new_zipfile_serialization" in text:
            code, message = (
                "legacy-bin-format",
                "this .bin uses the pre-1.6 torch serialization, which cannot be memory-mapped.",
            )
            hint = "re-save it with a current torch (torch.save), or convert it to safetensors."
        else:
            code, message = (
                "unreadable-bin",
                f"torch.load could not read the file ({type(exc).__name__}: {text.splitlines()[0] if text else ''}).",
            )
            hint = "the file is probably truncated or corrupt; re-download or re-save it."
        raise InvalidCheckpointError.one(file, code, message, hint=hint) from None
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


def write_bin(fh: BinaryIO, tensors: Mapping[str, torch.Tensor]) -> int:
    """``torch.save`` a flat state dict into ``fh``; return the bytes of tensor data.

    A tensor that is a view into a larger storage is cloned first, because ``torch.save``
    writes whole storages: without it, a small view would drag its base tensor into the file.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        out[name] = t
    torch.save(out, fh)
    return sum(t.numel() * t.element_size() for t in out.values())
