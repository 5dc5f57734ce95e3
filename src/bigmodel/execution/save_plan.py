"""The plan of a collective save, made locally and kept for the next save of an unchanged state.

A collective save plans its files from global metadata (names, dtypes, global shapes, tied
weights), so every rank can plan alone and get the same plan. A background save does exactly
that in the calling thread: no collective runs there (the training loop's stall is its staging
copy), and the workers compare the plans' digests in their first exchange over the side group,
so ranks that planned differently fail every handle with a :class:`~bigmodel.DistributedError`
instead of pairing the wrong gathers.

A training loop saves the same model again and again: :class:`PlanCache` keeps, per side
group and state kind, each DTensor's piece (local shape and global offset, the slow part of
turning DTensors into :class:`~bigmodel.execution.distributed_save.LocalShard`) and the plan,
under a :func:`signature` checked on every save (names, dtypes, shapes, meshes and placements:
a few attribute reads per tensor). A changed model misses and is planned again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bigmodel.checkpoint.sharding import ShardPlan
from bigmodel.execution.distributed import assign_owners
from bigmodel.execution.writing import WriteOptions, plan_files
from bigmodel.foundations.tensors import is_dtensor

__all__ = ["PlanCache", "SavePlan", "plan_key", "signature"]

#: (local shape, global offset) of a DTensor's piece; None: only ``full_tensor()`` gathers it
Piece = tuple[tuple[int, ...], tuple[int, ...]] | None


@dataclass(frozen=True)
class SavePlan:
    """Which names are stored (``aliases`` are not), in which files, written by which rank."""

    aliases: dict[str, str]
    files: ShardPlan
    names: list[str]
    index_name: str | None
    owners: list[int]
    #: the same on every rank that planned the same save; compared by the workers
    digest: str

    @classmethod
    def make(
        cls,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        opts: WriteOptions,
        limit: int,
        world: int,
        aliases: Mapping[str, str],
    ) -> SavePlan:
        """Plan the stored names of ``specs`` ((dtype, global shape) of every name)."""
        opts = dataclasses.replace(opts, aliases=dict(aliases))
        stored = {k: v for k, v in specs.items() if k not in aliases}
        files = plan_files(stored, limit, opts)
        names, index_name = opts.file_names(files)
        owners = assign_owners(files.sizes, world)
        described = repr((sorted(aliases.items()), files.shards, files.sizes, names, owners))
        digest = hashlib.sha256(described.encode()).hexdigest()
        return cls(dict(aliases), files, names, index_name, owners, digest)


def signature(state: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    """What a state's plan and pieces depend on, read cheaply from every tensor: names,
    dtypes, global shapes and, for DTensors, the mesh and the placements."""
    out: list[tuple[Any, ...]] = []
    for key, tensor in state.items():
        if is_dtensor(tensor):
            mesh, placements = tensor.device_mesh, tuple(tensor.placements)  # type: ignore[attr-defined]
            out.append((key, tensor.dtype, tuple(tensor.shape), mesh, placements))
        else:
            out.append((key, tensor.dtype, tuple(tensor.shape)))
    return tuple(out)


def plan_key(
    sig: tuple[Any, ...], aliases: Mapping[str, str], opts: WriteOptions, limit: int
) -> tuple[Any, ...]:
    """What a plan depends on beyond the group: the state's signature, its tied names, the
    shard size and the options that shape the files."""
    meta = tuple(sorted(opts.user_meta.items()))
    return (sig, tuple(sorted(aliases.items())), limit, opts.safe, meta, opts.dtype)


@dataclass
class _Entry:
    sig: tuple[Any, ...]
    pieces: dict[str, Piece]
    plan_key: tuple[Any, ...] | None = None
    plan: SavePlan | None = None


class PlanCache:
    """The last state's pieces and plan, per (side group, kind of state); see the module."""

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, str], _Entry] = {}

    def pieces(self, group: Any, kind: str, sig: tuple[Any, ...]) -> dict[str, Piece] | None:
        entry = self._entries.get((group, kind))
        return entry.pieces if entry is not None and entry.sig == sig else None

    def keep_pieces(
        self, group: Any, kind: str, sig: tuple[Any, ...], pieces: dict[str, Piece]
    ) -> None:
        entry = self._entries.get((group, kind))
        if entry is None or entry.sig != sig:
            self._entries[(group, kind)] = _Entry(sig, pieces)

    def plan(self, group: Any, kind: str, key: tuple[Any, ...]) -> SavePlan | None:
        entry = self._entries.get((group, kind))
        return entry.plan if entry is not None and entry.plan_key == key else None

    def keep_plan(self, group: Any, kind: str, key: tuple[Any, ...], plan: SavePlan) -> None:
        entry = self._entries.get((group, kind))
        if entry is not None:
            entry.plan_key, entry.plan = key, plan

    def clear(self) -> None:
        self._entries.clear()
