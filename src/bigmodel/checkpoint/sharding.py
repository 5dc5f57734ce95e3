"""Shard planning: Hugging Face file names, shared-storage deduplication, greedy packing.

Pure planning: nothing here touches the disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "SAFE_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "ShardPlan",
    "find_aliases",
    "is_weights_artifact",
    "plan_shards",
    "shard_name",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Files that belong to a checkpoint layout (ours or Hugging Face's). A save removes every one
#: of them that it did not write, so two layouts never coexist after a save.
_ARTIFACT_RE = re.compile(
    r"^(?:model(?:-\d{5}-of-\d{5})?\.safetensors|pytorch_model(?:-\d{5}-of-\d{5})?\.bin"
    r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$"
)


def is_weights_artifact(name: str) -> bool:
    """True for the standard weight and index file names of either format."""
    return _ARTIFACT_RE.match(name) is not None


def shard_name(index: int, count: int, *, safe: bool) -> str:
    """Hugging Face shard name: 1-based, zero-padded to 5; the bare name when there is one shard."""
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if count == 1:
        return f"{base}.{ext}"
    return f"{base}-{index + 1:05d}-of-{count:05d}.{ext}"


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
    )


def find_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each name whose tensor is an exact alias of an earlier name (same storage, offset,
    shape, stride and dtype: a tied weight) to that earlier name.

    Tensors that overlap the same storage in different ways (a slice, a transpose) are not
    aliases: each is stored as its own contiguous copy, because safetensors cannot express
    overlapping tensors.
    """
    first_by_storage: dict[tuple[str, int], list[str]] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key is None:
            continue
        seen = first_by_storage.setdefault(key, [])
        source = next((s for s in seen if _same_view(state[s], tensor)), None)
        if source is None:
            seen.append(name)
        else:
            aliases[name] = source
    return aliases


@dataclass(frozen=True)
class ShardPlan:
    """Which names go into which file, in file order."""

    shards: list[list[str]]
    sizes: list[int]

    @property
    def total_size(self) -> int:
        return sum(self.sizes)


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> ShardPlan:
    """Greedy packing in key order: a shard is closed when the next tensor would overflow it.

    A tensor larger than ``max_shard_size`` gets a shard of its own. Key order is kept across
    shards, so the shard numbers grow with the keys.
    """
    shards: list[list[str]] = []
    totals: list[int] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if current and current_size + size > max_shard_size:
            shards.append(current)
            totals.append(current_size)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
        totals.append(current_size)
    return ShardPlan(shards=shards, sizes=totals)
