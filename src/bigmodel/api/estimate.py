"""Will it fit? Bytes per device for a model or a checkpoint, from the one planner.

A model (``meta`` is fine) and a checkpoint (from its tensor names alone: no model class, no
weights read) are both described as a plan tree and placed by
:func:`bigmodel.placement.planner.plan` — the planner :func:`bigmodel.infer_device_map` uses —
so a model and the checkpoint saved from it get the same plan for the same budgets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.foundations.devices import normalize_device, parse_max_memory, planning_budgets
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.types import OffloadOptions, RemoteOptions
from bigmodel.placement.planner import (
    PlanNode,
    atoms,
    device_of,
    largest_unit,
    plan,
    tree_from_checkpoint,
    tree_from_module,
)

__all__ = [
    "Block",
    "DevicePlan",
    "Estimate",
    "estimate_checkpoint",
    "estimate_memory",
    "parse_max_memory",
]


@dataclass
class Block:
    """A unit the planner never splits (a repeated block such as ``model.layers.7``, a leaf
    module, or a bare tensor of a split module), its bytes and its number of tensor names."""

    name: str
    nbytes: int = 0
    tensors: int = 0


@dataclass
class DevicePlan:
    """One device: its budget, the blocks placed on it (in order), the bytes they use, and the
    bytes kept free on it for blocks streamed from cpu/disk (the execution device only)."""

    device: str
    budget: int | None  # None: unlimited (disk)
    blocks: list[str] = field(default_factory=list)
    used: int = 0
    reserved: int = 0


@dataclass
class Estimate:
    """Per-device plan, the units that fit nowhere, the largest unit that cannot be split
    (the least one device must hold) and the total bytes (tied tensors once). It fits when
    nothing is unplaced and no device uses more than its budget, its reserve included.
    ``implicit_disk``: ``max_memory`` named no disk and the plan added it, as accelerate does."""

    devices: list[DevicePlan]
    unplaced: list[Block]
    largest: Block
    total: int
    implicit_disk: bool = False

    @property
    def fits(self) -> bool:
        return not self.unplaced and all(
            d.budget is None or d.used + d.reserved <= d.budget for d in self.devices
        )


def _estimate(
    tree: PlanNode,
    budgets: tuple[dict[str, int | None], bool],
    offload: OffloadOptions | None = None,
) -> Estimate:
    offload = offload or OffloadOptions()
    main = None if offload.main_device is None else normalize_device(offload.main_device)
    placement = plan(tree, budgets[0], prefetch=offload.prefetch, execution=main)
    devices = {
        d: DevicePlan(d, b, used=placement.used[d], reserved=placement.reserved.get(d, 0))
        for d, b in budgets[0].items()
    }
    for atom in atoms(tree):
        device = device_of(atom.name, placement.device_map)
        if device is not None:
            devices[device].blocks.append(atom.name)
    unit = largest_unit(tree)
    largest = Block("(empty)") if unit is None else Block(unit.name, unit.nbytes, unit.tensors)
    return Estimate(
        devices=list(devices.values()),
        unplaced=[Block(u.name, u.nbytes, u.tensors) for u in placement.unplaced],
        largest=largest,
        total=tree.nbytes,
        implicit_disk=budgets[1],
    )


def estimate_checkpoint(
    ckpt: Checkpoint,
    max_memory: str | Mapping[Any, int | str | None],
    *,
    dtype: torch.dtype | None = None,
    offload: OffloadOptions | None = None,
) -> Estimate:
    """:func:`estimate_memory` for an open checkpoint and explicit budgets."""
    tree = tree_from_checkpoint(ckpt, dtype=dtype)
    return _estimate(tree, planning_budgets(max_memory), offload)


def estimate_memory(
    model_or_checkpoint: nn.Module | Checkpoint | str | os.PathLike[str],
    *,
    max_memory: str | Mapping[Any, int | str | None] | None = None,
    dtype: torch.dtype | str | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
    offload: OffloadOptions | None = None,
    remote: RemoteOptions | None = None,
) -> Estimate:
    """Bytes needed per device for a plan within ``max_memory``, the largest block, and whether
    it all fits — the numbers ``bigmodel estimate`` prints.

    A module (on ``meta`` is fine) is described by its module tree, a checkpoint (object or
    path) by its tensor names (repeated blocks are the numbered children of a name prefix,
    ``model.layers.7``; aliases of tied tensors are charged once); both are planned by the
    planner of :func:`bigmodel.infer_device_map`. ``no_split_module_classes`` applies to
    modules only. ``max_memory`` is a dict or a string like ``"0=20GB,cpu=8GB,disk"`` (only
    ``disk`` may be unlimited; without ``disk`` the rest is planned on disk, as
    :func:`~bigmodel.infer_device_map` does, and :attr:`Estimate.implicit_disk` says so) and
    defaults to free memory minus a reserve, then disk. :attr:`DevicePlan.blocks` are the
    units never split (see :class:`Block`) on each device; :attr:`DevicePlan.reserved` the room
    kept on the execution device for blocks streamed from cpu/disk (``offload``'s
    ``prefetch`` and ``main_device`` size it, as for a load). A checkpoint path may be a URL
    (``https://``, ``s3://``...): only its index and headers are fetched, read as ``remote``
    (:class:`~bigmodel.RemoteOptions`) says.
    """
    dtype = parse_dtype(dtype)
    budgets = planning_budgets(max_memory)
    if isinstance(model_or_checkpoint, nn.Module):
        tree = tree_from_module(
            model_or_checkpoint, dtype=dtype, no_split_module_classes=no_split_module_classes
        )
        return _estimate(tree, budgets, offload)
    if isinstance(model_or_checkpoint, Checkpoint):
        return _estimate(tree_from_checkpoint(model_or_checkpoint, dtype=dtype), budgets, offload)
    with open_checkpoint(model_or_checkpoint, remote=remote) as ckpt:
        return _estimate(tree_from_checkpoint(ckpt, dtype=dtype), budgets, offload)
