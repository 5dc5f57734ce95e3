"""Where each module lives: device maps, module sizes, and the planner's model entry point.

A device map is ``{module name: device}`` where a device is an accelerator (``"cuda:0"``,
written as ``0`` too), ``"cpu"`` or ``"disk"`` (see :mod:`bigmodel.foundations.devices`). Keys
match module and tensor names on dotted prefix boundaries only: ``layers.1`` covers
``layers.1.mlp.weight`` and never ``layers.10``. Plans come from the one planner,
:mod:`bigmodel.placement.planner`; :func:`infer_device_map` runs it on a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.foundations.devices import (
    Device,
    accelerate_device,
    default_max_memory,
    device_order,
    is_accelerator,
    normalize_device,
    planning_budgets,
)
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import PlanError
from bigmodel.foundations.types import OffloadOptions
from bigmodel.foundations.units import format_size
from bigmodel.placement.planner import Placement, plan, repeated_block_classes, tree_from_module
from bigmodel.storage.dtypes import stored_nbytes

__all__ = [
    "PlanError",
    "check_placement",
    "compute_module_sizes",
    "covering_key",
    "default_max_memory",
    "device_for",
    "execution_device",
    "infer_device_map",
    "normalize_device",
    "normalize_device_map",
    "repeated_block_classes",
    "set_hf_device_map",
    "warn_implicit_disk",
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
    accelerators = sorted({d for d in device_map.values() if is_accelerator(d)}, key=device_order)
    return accelerators[0] if accelerators else "cpu"


def normalize_device_map(device_map: Mapping[str, str | int | torch.device]) -> dict[str, Device]:
    """``{module name: device}`` with each device in its one spelling (see
    :func:`normalize_device`); an unknown device raises :class:`PlanError` naming its key."""
    out: dict[str, Device] = {}
    for key, device in device_map.items():
        try:
            out[key] = normalize_device(device)
        except PlanError as exc:
            raise PlanError(f"device_map[{key!r}]: {exc}") from None
    return out


def set_hf_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> None:
    """Set ``model.hf_device_map`` as accelerate's ``dispatch_model`` does after a
    device-mapped load: ``{module name: device}`` with accelerator indexes as ``int``
    (``{"model.layers.0": 0, "lm_head": "cpu"}``), ``"cpu"``/``"disk"`` (and ``"mps"``) as
    strings (:func:`~bigmodel.foundations.devices.accelerate_device`). transformers'
    ``generate``, pipelines and ``Trainer`` read it."""
    hf_map = {key: accelerate_device(device) for key, device in device_map.items()}
    object.__setattr__(model, "hf_device_map", hf_map)  # a plain attribute, as accelerate's


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
    offload: OffloadOptions | None = None,
) -> dict[str, Device]:
    """Plan ``{module name: device}`` so that every device stays within its budget.

    Runs the one planner (:mod:`bigmodel.placement.planner`, the same that plans a checkpoint
    for :func:`bigmodel.estimate_memory`) on the model's module tree, in registration order:
    devices are tried in order (accelerators, ``cpu``, ``disk``) and each is filled — a module
    that does not fit on a device is split into its children, unless its class is in
    ``no_split_module_classes`` (default: the classes of repeated blocks, see
    :func:`repeated_block_classes`), in which case it goes to the next device with room; the
    device it did not fit on stays open to later modules that fit. ``strategy="balanced"``
    spreads the model evenly over the accelerators instead of filling the first;
    ``"balanced_low_0"`` spreads it over the accelerators after the first, which keeps only
    what they cannot hold. A tensor tied across modules lives on one device, charged once:
    every module using it is placed there (all of them must fit there together, else they go
    to the next device together). When an accelerator runs modules kept on ``cpu``/``disk``,
    room for the largest of them plus the prefetch window is kept free on it (``offload``:
    its ``prefetch`` and ``main_device``, as the load will run them).

    ``max_memory`` is read by :func:`~bigmodel.foundations.devices.parse_max_memory` (only
    ``disk`` may be unlimited) and defaults to free memory minus ``reserve`` (see
    :func:`default_max_memory`). Without ``"disk"`` in it, what fits nowhere else goes to
    disk, as accelerate does, with a warning giving the bytes; ``"disk": 0`` forbids disk.
    Device names are canonical strings (``"cuda:0"``; accelerate's integers are
    :func:`~bigmodel.foundations.devices.accelerate_device`). Every plan returned keeps every
    budget; raise :class:`PlanError` when a block (with the modules tied to it) fits nowhere.
    """
    budgets, implicit_disk = planning_budgets(max_memory, reserve=reserve)
    tree = tree_from_module(
        model, dtype=parse_dtype(dtype), no_split_module_classes=no_split_module_classes
    )
    offload = offload or OffloadOptions()
    main = None if offload.main_device is None else normalize_device(offload.main_device)
    placement = plan(tree, budgets, strategy=strategy, prefetch=offload.prefetch, execution=main)
    check_placement(placement)
    if implicit_disk:
        warn_implicit_disk(placement)
    return placement.device_map


def check_placement(placement: Placement) -> None:
    """Raise :class:`PlanError` unless ``placement`` fits: the first block that fits nowhere,
    or the device over its budget with its reserve for streamed blocks."""
    if placement.unplaced:
        first = placement.unplaced[0]
        raise PlanError(_impossible(first.name, first.nbytes, placement.budgets))
    over = placement.over_budget()
    if not over:
        return
    reserved = {d: placement.reserved[d] for d in over if d in placement.reserved}
    if reserved:
        device, room = next(iter(reserved.items()))
        raise PlanError(
            f"{device} runs the modules kept on cpu/disk and must keep {format_size(room)} free "
            f"for them (the largest streamed block and the prefetch window), but its budget is "
            f"{format_size(placement.budgets[device] or 0)} [{PlanError.code}]. Fix: raise its "
            "max_memory, set OffloadOptions(prefetch=False) to keep room for one block only, "
            "or run offloaded modules on the cpu (OffloadOptions(main_device='cpu'))."
        )
    # the planner keeps every budget otherwise: this is a bug, never a plan to return
    listed = ", ".join(
        f"{d} uses {format_size(used)} of {format_size(placement.budgets[d] or 0)}"
        for d, used in over.items()
    )
    raise PlanError(f"The plan exceeds a budget ({listed}) [{PlanError.code}].")


def warn_implicit_disk(placement: Placement) -> None:
    """accelerate's convention, made visible: ``max_memory`` named no ``disk`` and the plan
    sends bytes there."""
    on_disk = placement.used.get("disk", 0)
    if not on_disk:
        return
    blocks = [k for k, d in placement.device_map.items() if d == "disk"]
    warnings.warn(
        f"max_memory names no 'disk': {format_size(on_disk)} of weights ({len(blocks)} "
        f"device-map entries, from {blocks[0]!r}) fit on no other device and are offloaded "
        "to disk, as accelerate does. Name 'disk' in max_memory to say so, raise the other "
        "budgets to keep them in memory, or pass 'disk': 0 to forbid disk.",
        UserWarning,
        stacklevel=3,
    )


def _impossible(name: str, need: int, budgets: Mapping[Device, int | None]) -> str:
    listed = ", ".join(
        f"{d}={'unlimited' if b is None else format_size(b)}" for d, b in budgets.items()
    )
    disk = budgets.get("disk")
    allow = (
        "allow disk (max_memory 'disk': None, or a larger 'disk' size) to offload the rest"
        if "disk" in budgets and disk is not None
        else "add 'disk' to offload the rest"
    )
    return (
        f"Module {name!r} needs {format_size(need)} (with the modules tied to it) and cannot be "
        f"split, but no device has that much room (budgets: {listed}) [{PlanError.code}]. "
        f"Fix: raise max_memory, {allow}, load in a smaller dtype, or allow splitting this "
        "module (remove its class from no_split_module_classes)."
    )
