"""Where each module lives: module sizes, device budgets, and the device-map planner.

A device map is ``{module name: device}`` where a device is an accelerator (``"cuda:0"``,
written as ``0`` too), ``"cpu"`` or ``"disk"``. Keys match module and tensor names on dotted
prefix boundaries only: ``layers.1`` covers ``layers.1.mlp.weight`` and never ``layers.10``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from bigmodel.foundations.errors import BigModelError
from bigmodel.foundations.units import format_size, parse_size

__all__ = [
    "PlanError",
    "compute_module_sizes",
    "covering_key",
    "default_max_memory",
    "device_for",
    "execution_device",
    "infer_device_map",
    "normalize_device",
]

Device = str


class PlanError(BigModelError, ValueError):
    """No placement of the model fits the budgets."""

    code = "no-placement"


def normalize_device(device: str | int | torch.device) -> Device:
    """``0`` / ``"0"`` / ``torch.device("cuda", 0)`` -> ``"cuda:0"``; ``"cpu"``, ``"disk"`` as is."""
    if isinstance(device, torch.device):
        return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    text = str(device)
    if text.isdigit():
        return f"cuda:{text}"
    if text in ("cpu", "disk") or (":" in text and text.split(":")[1].isdigit()):
        return text
    if text == "cuda":
        return "cuda:0"
    raise ValueError(
        f"Unknown device {device!r}: use an accelerator index (0), 'cuda:0', 'cpu' or 'disk'."
    )


def _device_rank(device: Device) -> tuple[int, int]:
    if device == "disk":
        return (2, 0)
    if device == "cpu":
        return (1, 0)
    return (0, int(device.split(":")[1]))


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
        {d for d in device_map.values() if d not in ("cpu", "disk")}, key=_device_rank
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


def _nbytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    itemsize = (
        dtype.itemsize
        if dtype is not None and tensor.is_floating_point()
        else tensor.element_size()
    )
    return tensor.numel() * itemsize


def _tensors(module: nn.Module, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(prefix=prefix, remove_duplicate=False)
    yield from module.named_buffers(prefix=prefix, remove_duplicate=False)


def compute_module_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of parameters and buffers under every module name (``""`` is the whole model).

    Works on ``meta`` models. ``dtype`` sizes floating-point tensors at that dtype. A tensor
    reachable under several names (tied weights) counts once, under the first module that
    reaches it in registration order, and in each of its ancestors.
    """
    sizes: dict[str, int] = {name: 0 for name, _ in model.named_modules(remove_duplicate=False)}
    seen: set[int] = set()
    for name, tensor in _tensors(model, ""):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        parts = name.split(".")[:-1]
        size = _nbytes(tensor, dtype)
        sizes[""] += size
        for i in range(1, len(parts) + 1):
            sizes[".".join(parts[:i])] = sizes.get(".".join(parts[:i]), 0) + size
    return sizes


def default_max_memory(*, reserve: float = 0.1) -> dict[Device, int | None]:
    """Free memory of every accelerator and available RAM, each minus ``reserve`` (a fraction
    kept for activations and temporaries), then unlimited disk."""
    budgets: dict[Device, int | None] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            budgets[f"cuda:{index}"] = int(free * (1 - reserve))
    budgets["cpu"] = int(psutil.virtual_memory().available * (1 - reserve))
    budgets["disk"] = None
    return budgets


def _budgets(
    max_memory: Mapping[str | int, int | str | None] | None, reserve: float
) -> dict[Device, int | None]:
    if max_memory is None:
        return default_max_memory(reserve=reserve)
    out: dict[Device, int | None] = {}
    for device, size in max_memory.items():
        out[normalize_device(device)] = None if size is None else parse_size(size)
    return dict(sorted(out.items(), key=lambda kv: _device_rank(kv[0])))


def repeated_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of the elements of ``ModuleList``/``Sequential`` containers whose children are
    all of one class (transformer layers): the natural units that must not be split."""
    classes: set[type[nn.Module]] = set()
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                classes |= kinds
    return classes


@dataclass
class _Unit:
    name: str
    module: nn.Module | None  # None for a bare parameter/buffer of a split module
    size: int


def infer_device_map(
    model: nn.Module,
    *,
    max_memory: Mapping[Any, int | str | None] | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
    dtype: torch.dtype | None = None,
    strategy: str = "auto",
    reserve: float = 0.1,
) -> dict[str, Device]:
    """Plan ``{module name: device}`` so that every device stays within its budget.

    Devices are filled in order (accelerators, ``cpu``, ``disk``) with whole modules, in
    registration order; a module that does not fit where the plan stands is split into its
    children unless its class is in ``no_split_module_classes`` (default: the classes of
    repeated blocks, see :func:`repeated_block_classes`), in which case it moves to the next
    device. ``strategy="balanced"`` spreads the model evenly over the accelerators instead of
    filling the first. Tensors tied across modules are charged once and their modules kept on
    one device. Budgets default to free memory minus ``reserve`` (see
    :func:`default_max_memory`); raise :class:`PlanError` when a block fits nowhere.
    """
    if strategy not in ("auto", "sequential", "balanced"):
        raise ValueError(f"Unknown strategy {strategy!r}; use 'auto', 'sequential' or 'balanced'.")
    budgets = _budgets(max_memory, reserve)
    sizes = compute_module_sizes(model, dtype)
    no_split_names = {
        c if isinstance(c, str) else c.__name__
        for c in (
            no_split_module_classes
            if no_split_module_classes is not None
            else repeated_block_classes(model)
        )
    }
    accelerators = [d for d in budgets if d not in ("cpu", "disk")]
    if strategy == "balanced" and len(accelerators) > 1:
        # Each accelerator but the last takes an even share; the last keeps its whole budget,
        # so that whole-block granularity never pushes the tail of the model off the accelerators.
        share = -(-sizes[""] // len(accelerators))
        for device in accelerators[:-1]:
            limit = budgets[device]
            budgets[device] = share if limit is None else min(limit, share)

    devices = list(budgets)
    used = dict.fromkeys(devices, 0)
    placed: dict[str, Device] = {}
    tensor_device: dict[int, Device] = {}  # id(tensor) -> device, for ties
    current = 0

    def tied_device(unit: _Unit) -> Device | None:
        tensors = (
            _tensors(unit.module, unit.name)
            if unit.module is not None
            else [(unit.name, _lookup(model, unit.name))]
        )
        for _, tensor in tensors:
            if id(tensor) in tensor_device:
                return tensor_device[id(tensor)]
        return None

    def new_bytes(unit: _Unit) -> int:
        tensors = (
            _tensors(unit.module, unit.name)
            if unit.module is not None
            else [(unit.name, _lookup(model, unit.name))]
        )
        seen: set[int] = set()
        total = 0
        for _, tensor in tensors:
            if id(tensor) not in tensor_device and id(tensor) not in seen:
                seen.add(id(tensor))
                total += _nbytes(tensor, dtype)
        return total

    def assign(unit: _Unit, device: Device) -> None:
        placed[unit.name] = device
        used[device] += new_bytes(unit)
        tensors = (
            _tensors(unit.module, unit.name)
            if unit.module is not None
            else [(unit.name, _lookup(model, unit.name))]
        )
        for _, tensor in tensors:
            tensor_device.setdefault(id(tensor), device)

    queue = [_Unit(name, child, sizes[name]) for name, child in model.named_children()]
    queue += [_Unit(name, None, _nbytes(t, dtype)) for name, t in _direct_tensors(model, "")]
    while queue:
        unit = queue.pop(0)
        forced = tied_device(unit)
        if forced is not None:
            assign(unit, forced)
            continue
        need = new_bytes(unit)
        while current < len(devices):
            device = devices[current]
            limit = budgets[device]
            if limit is None or used[device] + need <= limit:
                assign(unit, device)
                break
            splittable = (
                unit.module is not None
                and type(unit.module).__name__ not in no_split_names
                and len(list(unit.module.children())) > 0
            )
            if splittable:
                assert unit.module is not None
                children = [
                    _Unit(f"{unit.name}.{n}", c, sizes[f"{unit.name}.{n}"])
                    for n, c in unit.module.named_children()
                ]
                children += [
                    _Unit(n, None, _nbytes(t, dtype))
                    for n, t in _direct_tensors(unit.module, unit.name)
                ]
                queue = children + queue
                break
            if not any(
                b is None or b >= need
                for d, b in budgets.items()
                if _device_rank(d) >= _device_rank(device)
            ):
                raise PlanError(_impossible(unit.name, need, budgets))
            current += 1
        else:
            raise PlanError(_impossible(unit.name, need, budgets))
    return _merge(model, placed)


def _direct_tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    dotted = f"{prefix}." if prefix else ""
    out: list[tuple[str, torch.Tensor]] = [
        (dotted + n, p) for n, p in module._parameters.items() if p is not None
    ]
    out += [(dotted + n, b) for n, b in module._buffers.items() if b is not None]
    return out


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    tensor: torch.Tensor | None = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers[leaf]
    assert tensor is not None
    return tensor


def _impossible(name: str, need: int, budgets: Mapping[Device, int | None]) -> str:
    listed = ", ".join(
        f"{d}={'unlimited' if b is None else format_size(b)}" for d, b in budgets.items()
    )
    return (
        f"Module {name!r} needs {format_size(need)} and cannot be split, but no remaining device has that much "
        f"room (budgets: {listed}) [{PlanError.code}]. Fix: raise max_memory, add 'disk' to offload the rest, "
        "load in a smaller dtype, or allow splitting this module (remove its class from no_split_module_classes)."
    )


def _merge(model: nn.Module, placed: dict[str, Device]) -> dict[str, Device]:
    """Collapse children that all landed on one device back into their parent's entry."""
    result = dict(placed)
    changed = True
    while changed:
        changed = False
        parents = {k.rpartition(".")[0] for k in result if "." in k}
        for parent in sorted(parents, key=lambda p: -p.count(".")):
            module = model.get_submodule(parent)
            members = [f"{parent}.{n}" for n, _ in module.named_children()] + [
                n for n, _ in _direct_tensors(module, parent)
            ]
            if (
                members
                and all(m in result for m in members)
                and len({result[m] for m in members}) == 1
            ):
                device = result[members[0]]
                for m in members:
                    del result[m]
                result[parent] = device
                changed = True
                break
    top = [n for n, _ in model.named_children()] + [n for n, _ in _direct_tensors(model, "")]
    if (
        top
        and all(m in result for m in top)
        and len(set(result.values())) == 1
        and len(result) == len(top)
    ):
        return {"": next(iter(result.values()))}
    return result
