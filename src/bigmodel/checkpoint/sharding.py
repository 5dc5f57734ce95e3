"""Shard planning: shared-storage deduplication (tied tensors) and greedy packing into shards.

Pure planning: nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ShardPlan",
    "find_aliases",
    "plan_shards",
]


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes read the same way: a tied weight. A conjugate or negative view (lazy bits
    that change the values read from the same bytes) is never the same as its base."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.is_conj() == b.is_conj()
        and a.is_neg() == b.is_neg()
    )


def find_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each name whose tensor is an exact alias of an earlier name (same storage, offset,
    shape, stride, dtype and conjugate/negative bits: a tied weight) to that earlier name.

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
