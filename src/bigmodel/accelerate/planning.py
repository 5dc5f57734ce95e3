"""accelerate's planning helpers: ``compute_module_sizes``, ``get_balanced_memory`` and
``infer_auto_device_map``, answered by bigmodel's one planner (:mod:`bigmodel.placement.planner`).

What is accelerate's here: names, parameters, defaults (``no_split_module_classes=None`` splits
anything), device values (integers for accelerators), ``"disk"`` planned last even when
``max_memory`` does not name it, and room kept on the main devices (the first accelerator and
``cpu``, or ``cpu`` alone) for the largest block that is streamed to them. What stays
bigmodel's, on purpose (see the package docstring): budgets are filled (a block that does not
fit does not close a device to later blocks that do), tied tensors are charged once and every
budget is kept or :class:`~bigmodel.PlanError` is raised.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.foundations.devices import Device, default_max_memory, parse_max_memory
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import PlanError
from bigmodel.foundations.log import logger
from bigmodel.foundations.units import format_size
from bigmodel.placement.planner import (
    Placement,
    PlanNode,
    PlanTensor,
    atoms,
    device_of,
    plan,
    tree_from_module,
)
from bigmodel.storage.dtypes import stored_nbytes

__all__ = [
    "accelerate_device",
    "compute_module_sizes",
    "get_balanced_memory",
    "infer_auto_device_map",
]

MaxMemory = Mapping[Any, int | str | None]
DtypeLike = str | torch.dtype | None


def accelerate_device(device: Device) -> int | str:
    """A normalised bigmodel device as accelerate writes it: ``"cuda:1"`` -> ``1``."""
    if device in ("cpu", "disk"):
        return device
    index = device.partition(":")[2]
    return int(index) if index.isdigit() else device


def _named_tensors(model: nn.Module, buffers_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if not buffers_only:
        yield from model.named_parameters()
    yield from model.named_buffers()


def compute_module_sizes(
    model: nn.Module,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    buffers_only: bool = False,
) -> defaultdict[str, int]:
    """Bytes under every module and tensor name (``""`` is the whole model), as accelerate's
    function returns them: a ``defaultdict(int)``; a tied tensor counts once, under its first
    name. ``dtype`` sizes floating-point tensors at that dtype, ``special_dtypes`` sizes the
    tensors it names at theirs; ``buffers_only`` counts buffers alone.

    Differs from accelerate: a floating-point tensor is sized at ``dtype`` even when that is
    wider than its own (accelerate takes the smaller of the two, but its loader then casts to
    ``dtype``, so its sizes undercount an upcast).
    """
    cast = parse_dtype(dtype)
    special = {k: parse_dtype(v) for k, v in (special_dtypes or {}).items()}
    sizes: defaultdict[str, int] = defaultdict(int)
    for name, tensor in _named_tensors(model, buffers_only):
        own = special.get(name)
        size = stored_nbytes(tensor, own if own is not None else cast)
        parts = name.split(".")
        for end in range(len(parts) + 1):
            sizes[".".join(parts[:end])] += size
    return sizes


# -- budgets ------------------------------------------------------------------------------


def _budgets(max_memory: MaxMemory | None) -> tuple[dict[Device, int | None], bool]:
    """Budgets in plan order, and whether ``disk`` was added because the caller named none."""
    budgets = default_max_memory() if max_memory is None else parse_max_memory(max_memory)
    implicit_disk = "disk" not in budgets
    if implicit_disk:
        budgets["disk"] = None
    return budgets, implicit_disk


def _accelerate_budgets(budgets: Mapping[Device, int | None]) -> dict[int | str, int]:
    return {accelerate_device(d): b for d, b in budgets.items() if b is not None}


def _no_split_names(classes: Iterable[type[nn.Module] | str] | str | None) -> list[str]:
    if classes is None:
        return []
    if isinstance(classes, str):
        return [classes]
    return [c if isinstance(c, str) else c.__name__ for c in classes]


def _largest_block(model: nn.Module, sizes: Mapping[str, int], no_split: list[str]) -> int:
    """Size of the first instance of each no-split class (accelerate's rule), the largest."""
    seen: dict[str, int] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and kind in no_split and kind not in seen:
            seen[kind] = sizes.get(name, 0)
    return max(seen.values(), default=0)


def _mean_final_module(sizes: Mapping[str, int]) -> int:
    """Mean size of the modules that hold tensors but no sized submodule (accelerate's
    "final modules"): leaves of the size tree once the tensor names are taken off."""

    def leaves(names: Iterable[str]) -> set[str]:
        names = set(names)
        parents = {n.rpartition(".")[0] for n in names if "." in n}
        return {n for n in names if n and n not in parents}

    modules = set(sizes) - leaves(sizes)
    final = leaves(modules)
    return int(sum(sizes[n] for n in final) / max(len(final), 1))


def get_balanced_memory(
    model: nn.Module,
    max_memory: MaxMemory | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | str | None = None,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """A ``max_memory`` (integer keys for accelerators, sizes in bytes) that spreads the model
    evenly over the accelerators, for :func:`infer_auto_device_map`, as accelerate computes it:
    each accelerator but the last gets an even share of the model plus a margin (1.25x the
    larger of the largest no-split block and the mean final module); the last keeps its
    whole budget. ``low_zero`` keeps as little as possible on the first accelerator (for
    ``generate``). Without accelerators the budgets come back unchanged.

    Differs from accelerate: without ``max_memory`` the budgets are bigmodel's (free memory
    minus 10% on every device, see :func:`bigmodel.infer_device_map`) rather than all free
    memory with 10% off a single accelerator only; ``disk`` is returned only if named.
    """
    parsed = default_max_memory() if max_memory is None else parse_max_memory(max_memory)
    budgets = _accelerate_budgets(parsed)
    gpus = sorted(k for k, v in budgets.items() if isinstance(k, int) and v > 0)
    if not gpus:
        return budgets
    low_zero = low_zero and len(gpus) > 1
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    share = sizes[""] // (len(gpus) - 1 if low_zero else len(gpus))
    no_split = _no_split_names(no_split_module_classes)
    margin = max(_largest_block(model, sizes, no_split), _mean_final_module(sizes))
    share += int(1.25 * margin)
    first = gpus[0]
    for index in gpus[:-1]:
        budgets[index] = min(
            budgets[first] if low_zero and index == first else share, budgets[index]
        )
    if low_zero:
        rest = sum(budgets[i] for i in gpus[1:])
        budgets[first] = min(max(0, sizes[""] - rest), budgets[first])
    return budgets


# -- planning ----------------------------------------------------------------------------


def _tree(
    model: nn.Module,
    dtype: DtypeLike,
    special_dtypes: Mapping[str, str | torch.dtype] | None,
    no_split: list[str],
) -> PlanNode:
    """The planner's tree of ``model``; tensors named in ``special_dtypes`` sized at theirs."""
    tree = tree_from_module(model, dtype=parse_dtype(dtype), no_split_module_classes=no_split)
    if special_dtypes:
        numel = {
            name: t.numel()
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        }
        special = {k: parse_dtype(v) for k, v in special_dtypes.items()}
        for node in tree.walk():
            node.tensors = [
                PlanTensor(t.name, t.identity, numel[t.name] * dtype_.itemsize)
                if (dtype_ := special.get(t.name)) is not None
                else t
                for t in node.tensors
            ]
    return tree


#: This module keeps accelerate's room itself; a planner that keeps its own headroom is told
#: not to (``plan(headroom=False)``), so the room is not kept twice.
_OWN_ROOM: dict[str, Any] = (
    {"headroom": False} if "headroom" in inspect.signature(plan).parameters else {}
)


def _rooms_needed(
    blocks: list[tuple[str, int]], device_map: Mapping[str, Device], accelerators: list[Device]
) -> dict[Device, int]:
    """Room each main device needs for the blocks streamed through it: the first accelerator
    runs every block kept on ``cpu`` or ``disk``; ``cpu`` reads every block kept on ``disk``."""

    def largest(devices: set[Device]) -> int:
        return max((s for n, s in blocks if device_of(n, device_map) in devices), default=0)

    rooms = {"cpu": largest({"disk"})}
    if accelerators:
        rooms[accelerators[0]] = largest({"cpu", "disk"})
    return rooms


def _plan_with_room(
    tree: PlanNode, budgets: dict[Device, int | None]
) -> tuple[Placement, dict[Device, int]]:
    """Plan with room kept on the main devices for the largest block streamed through them
    (see :func:`_rooms_needed`), and return the rooms kept.

    Rooms start empty and grow to what the plan needs until the plan keeps what it needs:
    each round only raises a room to the size of a block, so the rounds end."""
    accelerators = [d for d in budgets if d not in ("cpu", "disk")]
    blocks = [(atom.name, atom.nbytes) for atom in atoms(tree)]
    rooms: dict[Device, int] = {}
    for _ in range(4 * len(blocks) + 1):
        reduced = {
            d: None if b is None else max(0, b - rooms.get(d, 0)) for d, b in budgets.items()
        }
        placement = plan(tree, reduced, **_OWN_ROOM)
        needed = _rooms_needed(blocks, placement.device_map, accelerators)
        if all(need <= rooms.get(d, 0) for d, need in needed.items()):
            break
        rooms = {d: max(rooms.get(d, 0), need) for d, need in needed.items()}
    placement.budgets = dict(budgets)
    return placement, rooms


def _check(placement: Placement) -> None:
    if placement.unplaced:
        first = placement.unplaced[0]
        listed = ", ".join(
            f"{d}={'unlimited' if b is None else format_size(b)}"
            for d, b in placement.budgets.items()
        )
        raise PlanError(
            f"Module {first.name!r} needs {format_size(first.nbytes)} (with the modules tied "
            f"to it) and cannot be split, but no device has that much room once room for the "
            f"largest streamed block is kept (budgets: {listed}) [{PlanError.code}]. Fix: "
            "raise max_memory, or leave its class out of no_split_module_classes."
        )


def _warn_buffers(
    model: nn.Module,
    placement: Placement,
    budgets: Mapping[Device, int | None],
    rooms: Mapping[Device, int],
) -> None:
    """accelerate's warning: buffers of modules kept on cpu/disk run on an accelerator, and
    no accelerator has room left for them."""
    accelerators = [d for d in budgets if d not in ("cpu", "disk")]
    if not accelerators:
        return
    offloaded = sum(
        stored_nbytes(b)
        for name, b in model.named_buffers()
        if device_of(name, placement.device_map) in ("cpu", "disk")
    )
    room = [(budgets[d] or 0) - placement.used.get(d, 0) - rooms.get(d, 0) for d in accelerators]
    if offloaded and max(room) < offloaded:
        warnings.warn(
            f"The buffers of the modules kept on cpu/disk need {offloaded} bytes on the "
            "execution device, which no accelerator has left after this plan. If you run out "
            "of memory, pass offload_buffers=True.",
            stacklevel=3,
        )


def _warn_implicit_disk(placement: Placement) -> None:
    on_disk = placement.used.get("disk", 0)
    if on_disk:
        warnings.warn(
            f"max_memory names no 'disk': {format_size(on_disk)} that fit nowhere else go to "
            "disk (accelerate's convention). Add 'disk' to max_memory to say so, or raise the "
            "other budgets to keep them in memory.",
            stacklevel=3,
        )


def infer_auto_device_map(
    model: nn.Module,
    max_memory: MaxMemory | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | str | None = None,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> OrderedDict[str, int | str]:
    """Plan ``{module name: device}`` for ``model`` (``meta`` is fine), accelerate's way round:
    accelerators (as integers), then ``cpu``, then ``disk`` (planned last even when
    ``max_memory`` does not name it: a warning gives the bytes sent there);
    ``no_split_module_classes=None`` lets any module be split; room for the largest block
    streamed from ``cpu``/``disk`` is kept on the main devices; ``special_dtypes`` sizes the
    tensors it names at their own dtype; without ``offload_buffers``, accelerate's warning when
    the buffers of offloaded modules fit on no accelerator.

    Differs from accelerate: the plan is bigmodel's planner's. Every device is filled (what
    ``fallback_allocation=True`` asks of accelerate is always done), tied tensors are charged
    once, the result is always cleaned (``clean_result`` is accepted), ``verbose`` logs the plan
    instead of printing, and a block that fits nowhere raises :class:`~bigmodel.PlanError`
    where accelerate returns a map that overruns a budget.
    """
    del clean_result, fallback_allocation  # always cleaned; always filled
    budgets, implicit_disk = _budgets(max_memory)
    tree = _tree(model, dtype, special_dtypes, _no_split_names(no_split_module_classes))
    placement, rooms = _plan_with_room(tree, budgets)
    _check(placement)
    if implicit_disk:
        _warn_implicit_disk(placement)
    if not offload_buffers:
        _warn_buffers(model, placement, budgets, rooms)
    result: OrderedDict[str, int | str] = OrderedDict(
        (name, accelerate_device(device)) for name, device in placement.device_map.items()
    )
    if verbose:
        logger.info("infer_auto_device_map: %s (bytes used: %s)", dict(result), placement.used)
    return result
