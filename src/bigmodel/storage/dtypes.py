"""Storage layer: how tensors are encoded in files. Nothing above this package parses bytes."""

from __future__ import annotations

import torch

__all__ = ["stored_dtype", "stored_nbytes"]


def stored_dtype(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is written with: ``cast`` for floating-point tensors, else its own."""
    return cast if cast is not None and tensor.is_floating_point() else tensor.dtype


def stored_nbytes(tensor: torch.Tensor, cast: torch.dtype | None = None) -> int:
    return tensor.numel() * stored_dtype(tensor, cast).itemsize
