"""Where each module lives: device maps, module sizes, and the planner's model entry point.

A device map is ``{module name: device}`` where a device is an accelerator (``"cuda:0"``,
written as ``0`` too), ``"cpu"`` or ``"disk"`` (see :mod:`bigmodel.foundations.devices`). Keys
match module and tensor names on dotted prefix boundaries only: ``layers.1`` covers
``layers.1.mlp.weight`` and never ``layers.10``. Plans come from the one planner,
:mod:`bigmodel.placement.planner`; :func:`infer_device_map` runs it on a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.foundations.devices import (
    Device,
    default_max_memory,
    device_order,
    normalize_device,
    parse_max_memory,
)
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import PlanError
from bigmodel.foundations.units import format_size
from bigmodel.placement.planner import plan, repeated_block_classes, tree_from_module
from bigmodel.storage.dtypes import stored_nbytes

__all__ = [
    "PlanError",
    "compute_module_sizes",
    "covering_key",
    "default_max_memory",
    "device_for",
    "execution_device",
    "infer_device_map",
    "normalize_device",
    "repeated_block_classes",
]


def execution_device(
    device_map: Mapping[str, Device], main_device: str | int | torch.device | None = None
) -> Device:
    """Where offloaded modules run and outputs are returned: ``main_device`` if given, else the
    first accelerator of the map (``cuda:2`` before ``cuda:10``), else ``cpu``."""
    if main_device is not None:
        device = normalize_device(main_device)
        if device == "disk":
            raise ValueError(
                "main_device='disk': modules cannot run on disk; pick 'cpu' or an accelerator."
            )
        return device
    accelerators = sorted(
        {d for d in device_map.values() if d not in ("cpu", "disk")}, key=device_order
    )
    return accelerators[0] if accelerators else "cpu"


def covering_key(name: str, device_map: Mapping[str, Device]) -> str | None:
    """The device-map key that decides ``name``: the longest key equal to it or a dotted
    prefix of it (``""`` covers the whole model)."""
    best: str | None = None
    for key in device_map:
        covers = key == "" or name == key or name.startswith(key + ".")
        if covers and (best is None or len(key) > len(best)):
            best = key
    return best


def device_for(name: str, device_map: Mapping[str, Device]) -> Device | None:
    """The device of module or tensor ``name`` (see :func:`covering_key`), or None."""
    key = covering_key(name, device_map)
    return None if key is None else device_map[key]


def _tensors(module: nn.Module, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(prefix=prefix, remove_duplicate=False)
    yield from module.named_buffers(prefix=prefix, remove_duplicate=False)


def compute_module_sizes(
    model: nn.Module, dtype: torch.dtype | str | None = None
) -> dict[str, int]:
    """Bytes of parameters and buffers under every module name (``""`` is the whole model).

    Works on ``meta`` models. ``dtype`` sizes floating-point tensors at that dtype. A tensor
    reachable under several names (tied weights) counts once, under the first module that
    reaches it in registration order, and in each of its ancestors.
    """
    cast = parse_dtype(dtype)
    sizes: dict[str, int] = {name: 0 for name, _ in model.named_modules(remove_duplicate=False)}
    seen: set[int] = set()
    for name, tensor in _tensors(model, ""):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        parts = name.split(".")[:-1]
        size = stored_nbytes(tensor, cast)
        sizes[""] += size
        for i in range(1, len(parts) + 1):
            sizes[".".join(parts[:i])] = sizes.get(".".join(parts[:i]), 0) + size
    return sizes


def infer_device_map(
    model: nn.Module,
    *,
    max_memory: Mapping[Any, int | str | None] | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
    dtype: torch.dtype | str | None = None,
    strategy: str = "auto",
    reserve: float = 0.1,
) -> dict[str, Device]:
    """Plan ``{module name: device}`` so that every device stays within its budget.

    Runs the one planner (:mod:`bigmodel.placement.planner`, the same that plans a checkpoint
    for :func:`bigmodel.estimate_memory`) on the model's module tree, in registration order:
    devices are tried in order (accelerators, ``cpu``, ``disk``) and each is filled — a module
    that does not fit on a device is split into its children, unless its class is in
    ``no_split_module_classes`` (default: the classes of repeated blocks, see
    :func:`repeated_block_classes`), in which case it goes to the next device with room; the
    device it did not fit on stays open to later modules that fit. ``strategy="balanced"``
    spreads the model evenly over the accelerators instead of filling the first. A tensor tied
    across modules lives on one device, charged once: every module using it is placed there
    (all of them must fit there together, else they go to the next device together).
    ``max_memory`` is read by :func:`~bigmodel.foundations.devices.parse_max_memory` (only
    ``disk`` may be unlimited) and defaults to free memory minus ``reserve`` (see
    :func:`default_max_memory`). Every plan returned keeps every budget; raise
    :class:`PlanError` when a block (with the modules tied to it) fits nowhere.
    """
    budgets = (
        default_max_memory(reserve=reserve) if max_memory is None else parse_max_memory(max_memory)
    )
    tree = tree_from_module(
        model, dtype=parse_dtype(dtype), no_split_module_classes=no_split_module_classes
    )
    placement = plan(tree, budgets, strategy=strategy)
    if placement.unplaced:
        first = placement.unplaced[0]
        raise PlanError(_impossible(first.name, first.nbytes, placement.budgets))
    over = placement.over_budget()
    if over:  # the planner keeps every budget: this is a bug, never a plan to return
        listed = ", ".join(
            f"{d} uses {format_size(used)} of {format_size(placement.budgets[d] or 0)}"
            for d, used in over.items()
        )
        raise PlanError(f"The plan exceeds a budget ({listed}) [{PlanError.code}].")
    return placement.device_map


def _impossible(name: str, need: int, budgets: Mapping[Device, int | None]) -> str:
    listed = ", ".join(
        f"{d}={'unlimited' if b is None else format_size(b)}" for d, b in budgets.items()
    )
    return (
        f"Module {name!r} needs {format_size(need)} (with the modules tied to it) and cannot be split, but no device has that much "
        f"room (budgets: {listed}) [{PlanError.code}]. Fix: raise max_memory, add 'disk' to offload the rest, "
        "load in a smaller dtype, or allow splitting this module (remove its class from no_split_module_classes)."
    )
