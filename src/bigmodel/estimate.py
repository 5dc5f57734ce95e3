"""Will a checkpoint fit? Plan from tensor names alone: no model class, no weights read.

Tensors are grouped into blocks by their repeated-block prefix (``model.layers.7.``: the path
up to the first numeric component); tensors outside repeated blocks are grouped by the module
that owns them (``model.embed_tokens``, ``lm_head``). Blocks are then placed in checkpoint
order, each whole, on the devices in the order given (accelerators, then ``cpu``, then
``disk``), each up to its budget.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ._units import parse_size
from .checkpoint import Checkpoint

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
