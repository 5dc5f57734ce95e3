"""Will a checkpoint fit? Plan from tensor names alone: no model class, no weights read.

Tensors are grouped into blocks by their repeated-block prefix (``model.layers.7.``: the path
up to the first numeric component); tensors outside repeated blocks are grouped by the module
that owns them (``model.embed_tokens``, ``lm_head``). Blocks are then placed in checkpoint
order, each whole, on the devices in the order given (accelerators, then ``cpu``, then
``disk``), each up to its budget.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.foundations.units import parse_size
from bigmodel.placement.device_map import (
    PlanError,
    compute_module_sizes,
    default_max_memory,
    device_for,
    infer_device_map,
    repeated_block_classes,
)

__all__ = [
    "Block",
    "DevicePlan",
    "Estimate",
    "estimate_checkpoint",
    "group_blocks",
    "parse_max_memory",
]

_NUMERIC = re.compile(r"^\d+$")


@dataclass
class Block:
    name: str
    nbytes: int = 0
    tensors: int = 0


@dataclass
class DevicePlan:
    device: str
    budget: int | None  # None: unlimited (disk)
    blocks: list[str] = field(default_factory=list)
    used: int = 0


@dataclass
class Estimate:
    devices: list[DevicePlan]
    unplaced: list[Block]
    largest: Block
    total: int

    @property
    def fits(self) -> bool:
        return not self.unplaced


def block_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _NUMERIC.match(part) and i > 0:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    ]


def group_blocks(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> list[Block]:
    """Blocks in checkpoint order with their size at ``dtype`` (floats cast, others kept)."""
    blocks: dict[str, Block] = {}
    # Model order: shard by shard (writers fill shards in model order), then by name with
    # numbers compared as numbers (layers.2 before layers.10).
    order = {file: i for i, file in enumerate(ckpt.files)}
    keys = sorted(ckpt.stored_keys(), key=lambda k: (order[ckpt.tensor_info(k).file], _natural(k)))
    for key in keys:
        info = ckpt.tensor_info(key)
        itemsize = (
            dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        ).itemsize
        block = blocks.setdefault(block_of(key), Block(block_of(key)))
        block.nbytes += info.numel * itemsize
        block.tensors += 1
    return list(blocks.values())


def _device_order(name: str) -> tuple[int, int]:
    if name == "disk":
        return (2, 0)
    if name == "cpu":
        return (1, 0)
    index = name.split(":")[-1]
    return (0, int(index) if index.isdigit() else 0)


def parse_max_memory(text: str | Mapping[str, int | str | None]) -> dict[str, int | None]:
    """``"0=20GB,cpu=8GB,disk"`` or a dict -> {device: bytes or None for unlimited}.

    Accelerators are written as an index (``0``) or ``cuda:0``; ``disk`` may omit a size.
    """
    items: list[tuple[object, str | int | None]]
    if isinstance(text, str):
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            dev, sep, amount = part.partition("=")
            items.append((dev.strip(), amount.strip() if sep else None))
    else:
        items = list(text.items())
    out: dict[str, int | None] = {}
    for raw_device, size in items:
        device = str(raw_device)
        name = f"cuda:{device}" if device.isdigit() else device
        if not (name in ("cpu", "disk") or re.match(r"^[a-z]+:\d+$", name)):
            raise ValueError(
                f"Unknown device {device!r} in max_memory; use an accelerator index (0), 'cuda:0', 'cpu' or 'disk'."
            )
        if size is None and name != "disk":
            raise ValueError(f"max_memory for {device!r} needs a size, e.g. {device}=8GB.")
        out[name] = None if size is None else parse_size(size)
    return dict(sorted(out.items(), key=lambda kv: _device_order(kv[0])))


def estimate_checkpoint(
    ckpt: Checkpoint, max_memory: Mapping[str, int | None], *, dtype: torch.dtype | None = None
) -> Estimate:
    blocks = group_blocks(ckpt, dtype)
    devices = [DevicePlan(device=d, budget=b) for d, b in max_memory.items()]
    unplaced: list[Block] = []
    current = 0
    for block in blocks:
        while current < len(devices):
            plan = devices[current]
            if plan.budget is None or plan.used + block.nbytes <= plan.budget:
                plan.blocks.append(block.name)
                plan.used += block.nbytes
                break
            current += 1
        else:
            unplaced.append(block)
    largest = max(blocks, key=lambda b: b.nbytes, default=Block("(empty)"))
    return Estimate(
        devices=devices, unplaced=unplaced, largest=largest, total=sum(b.nbytes for b in blocks)
    )


def _model_estimate(
    model: nn.Module,
    budgets: dict[str, int | None],
    dtype: torch.dtype | None,
    no_split: Iterable[type[nn.Module] | str] | None,
) -> Estimate:
    sizes = compute_module_sizes(model, dtype)
    classes = {
        c if isinstance(c, str) else c.__name__
        for c in (no_split if no_split is not None else repeated_block_classes(model))
    }
    blocks = [
        Block(name, sizes[name], 0)
        for name, module in model.named_modules()
        if type(module).__name__ in classes
    ]
    largest = max(
        blocks or [Block(n, sizes[n]) for n, _ in model.named_children()] or [Block("", sizes[""])],
        key=lambda b: b.nbytes,
    )
    try:
        plan = infer_device_map(
            model, max_memory=budgets, no_split_module_classes=no_split, dtype=dtype
        )
    except PlanError:
        return Estimate(
            devices=[DevicePlan(d, b) for d, b in budgets.items()],
            unplaced=[Block("", sizes[""])],
            largest=largest,
            total=sizes[""],
        )
    devices = {d: DevicePlan(d, b) for d, b in budgets.items()}
    for name, device in plan.items():
        devices[device].blocks.append(name)
    seen: set[int] = set()
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        placed = device_for(name, plan)
        assert placed is not None, name
        devices[placed].used += tensor.numel() * (
            dtype.itemsize
            if dtype is not None and tensor.is_floating_point()
            else tensor.element_size()
        )
    return Estimate(devices=list(devices.values()), unplaced=[], largest=largest, total=sizes[""])


def estimate_memory(
    model_or_checkpoint: nn.Module | Checkpoint | str | os.PathLike[str],
    *,
    max_memory: str | Mapping[str, int | str | None] | None = None,
    dtype: torch.dtype | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
) -> Estimate:
    """Bytes needed per device for a plan within ``max_memory``, the largest block, and whether
    it all fits — the numbers ``bigmodel estimate`` prints.

    A module (on ``meta`` is fine) is planned with :func:`bigmodel.infer_device_map`; a
    checkpoint (object or path) from its tensor names alone (:func:`group_blocks`).
    ``max_memory`` defaults to free memory minus a reserve, then disk.
    """
    budgets = default_max_memory() if max_memory is None else parse_max_memory(max_memory)
    if isinstance(model_or_checkpoint, nn.Module):
        return _model_estimate(model_or_checkpoint, budgets, dtype, no_split_module_classes)
    if isinstance(model_or_checkpoint, Checkpoint):
        return estimate_checkpoint(model_or_checkpoint, budgets, dtype=dtype)
    with open_checkpoint(model_or_checkpoint) as ckpt:
        return estimate_checkpoint(ckpt, budgets, dtype=dtype)
