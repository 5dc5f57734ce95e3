"""Questions about tensors that every layer asks, answered without importing heavy modules."""

from __future__ import annotations

import sys

import torch

__all__ = ["is_dtensor"]


# -- sharded tensors --------------------------------------------------------------------------
def is_dtensor(tensor: torch.Tensor) -> bool:
    # No import: DTensor's modules cost tens of MB, and a tensor can only be a DTensor if
    # the caller already imported them.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
