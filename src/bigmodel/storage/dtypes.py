"""Storage layer: how tensors are encoded in files. Nothing above this package parses bytes.

Dtypes are known here by name (``"bfloat16"``) with their element size, so that headers can
be parsed, checked and described without importing torch (``bigmodel inspect`` and
``bigmodel verify`` never make a tensor); :func:`torch_dtype` resolves a name to the torch
dtype, importing torch, only when a tensor is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ITEMSIZE", "has_torch_dtype", "stored_dtype", "stored_nbytes", "torch_dtype"]

#: Bytes per element of every dtype a weights file may hold, by torch's attribute name.
ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (a key of :data:`ITEMSIZE`); imports torch.

    Raises ``ValueError`` when this torch build lacks it (the float8 variants are recent).
    """
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"dtype {name} is not available in torch {torch.__version__}; upgrade torch to read it."
        )
    return dtype


def has_torch_dtype(name: str) -> bool:
    """Whether this torch build has the dtype ``name`` (imports torch)."""
    try:
        torch_dtype(name)
    except ValueError:
        return False
    return True


def stored_dtype(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is written with: ``cast`` for floating-point tensors, else its own."""
    return cast if cast is not None and tensor.is_floating_point() else tensor.dtype


def stored_nbytes(tensor: torch.Tensor, cast: torch.dtype | None = None) -> int:
    return tensor.numel() * stored_dtype(tensor, cast).itemsize
