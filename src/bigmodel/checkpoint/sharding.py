"""Shard planning: shared-storage deduplication (tied tensors) and greedy packing into shards.

Pure planning: nothing here touches the disk. Every file planned for safetensors stays inside
the limits the reader enforces, which are defined once, in :mod:`bigmodel.storage.safetensors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bigmodel.foundations.errors import UnsupportedTensorError
from bigmodel.storage.safetensors import (
    MAX_HEADER_SIZE,
    MAX_TENSORS,
    header_entry_bound,
    metadata_bound,
)

__all__ = [
    "FileLimits",
    "ShardPlan",
    "TensorSpec",
    "plan_safetensors",
    "stored_sizes",
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


@dataclass(frozen=True)
class FileLimits:
    """What one file may hold besides its data bytes, as its reader will check: entries, and
    header bytes (each entry's cost is given with the sizes). None: no such limit."""

    max_entries: int | None = None
    max_header_bytes: int | None = None


def _fits(count: int, header: int, cost: int, limits: FileLimits) -> bool:
    if limits.max_entries is not None and count + 1 > limits.max_entries:
        return False
    return limits.max_header_bytes is None or header + cost <= limits.max_header_bytes


def plan_shards(
    sizes: Mapping[str, int],
    max_shard_size: int,
    *,
    header_costs: Mapping[str, int] | None = None,
    limits: FileLimits = FileLimits(),
) -> ShardPlan:
    """Greedy packing in key order: a shard is closed when the next tensor would overflow it.

    A tensor larger than ``max_shard_size`` gets a shard of its own. ``limits`` are hard: a
    shard is also closed before it would hold more entries, or more header bytes (each key's
    ``header_costs``), than its reader accepts. Key order is kept across shards, so the shard
    numbers grow with the keys.
    """
    shards: list[list[str]] = []
    totals: list[int] = []
    current: list[str] = []
    current_size = header = 0
    for name, size in sizes.items():
        cost = header_costs[name] if header_costs is not None else 0
        if limits.max_header_bytes is not None and cost > limits.max_header_bytes:
            raise UnsupportedTensorError(
                f"Tensor {name!r} alone needs {cost} bytes of file header (its name or shape), "
                f"above the {limits.max_header_bytes} bytes a reader accepts. Fix: shorten its name."
            )
        overflow = current_size + size > max_shard_size
        if current and (overflow or not _fits(len(current), header, cost, limits)):
            shards.append(current)
            totals.append(current_size)
            current, current_size, header = [], 0, 0
        current.append(name)
        current_size += size
        header += cost
    if current or not shards:
        shards.append(current)
        totals.append(current_size)
    return ShardPlan(shards=shards, sizes=totals)


TensorSpec = tuple[torch.dtype, tuple[int, ...]]


def stored_sizes(tensors: Mapping[str, TensorSpec], cast: torch.dtype | None) -> dict[str, int]:
    """Bytes of each (dtype, shape) once stored: floating-point dtypes become ``cast``."""
    return {
        name: math.prod(shape)
        * (cast if cast is not None and dtype.is_floating_point else dtype).itemsize
        for name, (dtype, shape) in tensors.items()
    }


def plan_safetensors(
    tensors: Mapping[str, TensorSpec],
    max_shard_size: int,
    *,
    cast: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ShardPlan:
    """:func:`plan_shards` for safetensors files: (dtype, shape) of each tensor, sizes at the
    stored dtype, and every file inside the limits bigmodel's reader enforces
    (:data:`~bigmodel.storage.safetensors.MAX_TENSORS` entries,
    :data:`~bigmodel.storage.safetensors.MAX_HEADER_SIZE` header bytes, of which ``metadata``
    takes its share in every file)."""
    sizes = stored_sizes(tensors, cast)
    costs = {name: header_entry_bound(name, shape) for name, (_, shape) in tensors.items()}
    budget = MAX_HEADER_SIZE - metadata_bound(metadata or {})
    if budget <= 0:
        raise ValueError(
            f"The metadata takes {metadata_bound(metadata or {})} bytes of every file's header, above "
            f"the {MAX_HEADER_SIZE} bytes a reader accepts. Fix: store less metadata."
        )
    limits = FileLimits(max_entries=MAX_TENSORS, max_header_bytes=budget)
    return plan_shards(sizes, max_shard_size, header_costs=costs, limits=limits)
