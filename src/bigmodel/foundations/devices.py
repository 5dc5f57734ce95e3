"""The one device vocabulary: device names, their order, and memory budgets per device.

A device is an accelerator (``"cuda:0"``, also written ``0``, ``"0"``, ``"cuda"`` or
``torch.device("cuda", 0)``; ``"mps:0"``, ``"xpu:1"``... likewise), ``"cpu"`` or ``"disk"``.
Plans and budgets use these canonical strings; accelerate's and transformers' device maps
write accelerator indexes as integers (:func:`accelerate_device` converts). Devices are always ordered the same way:
accelerators by index, then ``cpu``, then ``disk`` — the order in which a plan fills them.

A memory budget (``max_memory``) is written either as a mapping ``{device: size}`` or as the
command-line string ``"0=20GB,cpu=8GB,disk"``. Sizes go through
:func:`bigmodel.foundations.units.parse_size`. An unlimited budget (``None`` in a mapping, a
device without ``=SIZE`` in the string) is allowed for ``disk`` only: an unlimited accelerator
or ``cpu`` budget would let a plan put more there than the device holds, and the load would
then fail part-way instead of being refused up front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import psutil
import torch

from bigmodel.foundations.errors import PlanError
from bigmodel.foundations.units import parse_size

__all__ = [
    "ACCELERATOR_TYPES",
    "Device",
    "accelerate_device",
    "default_max_memory",
    "device_order",
    "index_device_type",
    "is_accelerator",
    "normalize_device",
    "parse_max_memory",
    "planning_budgets",
    "sort_devices",
]

Device = str

_FORMS = "an accelerator index (0) or name ('mps', 'xpu:1'), 'cuda:0', 'cpu' or 'disk'"

#: Device types that run modules besides the CPU, as torch names them (``privateuseone`` and a
#: renamed private backend are added at run time). ``meta`` is not a place for weights.
ACCELERATOR_TYPES = frozenset(
    {"cuda", "xpu", "npu", "mps", "hpu", "mlu", "musa", "xla", "mtia", "ipu", "privateuseone"}
)


def _accelerator_types() -> frozenset[str]:
    return ACCELERATOR_TYPES | {torch._C._get_privateuse1_backend_name()}


def index_device_type() -> str:
    """The accelerator type a bare index (``0``) names: the one this machine has (``xpu`` on an
    Intel GPU, ...), ``cuda`` when it has none (planning for a machine is possible anywhere)."""
    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return "cuda" if current is None or current.type == "cpu" else current.type


def normalize_device(device: str | int | torch.device) -> Device:
    """One spelling per device: ``0`` / ``"0"`` / ``"cuda"`` / ``torch.device("cuda", 0)`` ->
    ``"cuda:0"`` (a bare index names this machine's accelerator type, see
    :func:`index_device_type`); an accelerator type with or without index (``"mps"``,
    ``"xpu:1"``, ``torch.device("npu")``) -> ``"<type>:<index>"``; ``"cpu"`` (also ``"cpu:0"``)
    and ``"disk"`` as is. Anything else (``"meta"``, ``"gpu"``, ``-1``, ``True``) raises
    :class:`~bigmodel.PlanError` (a ``ValueError``) naming it and the accepted forms."""
    if isinstance(device, torch.device):
        return _from_parts(device, device.type, "" if device.index is None else str(device.index))
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise PlanError(f"Unknown device {device!r}: use {_FORMS} [{PlanError.code}].")
    text = str(device).strip()
    if text.isdigit():
        return f"{index_device_type()}:{int(text)}"
    if text == "disk":
        return text
    kind, sep, index = text.partition(":")
    if sep and not index.isdigit():
        raise PlanError(f"Unknown device {device!r}: use {_FORMS} [{PlanError.code}].")
    return _from_parts(device, kind, index)


def _from_parts(raw: object, kind: str, index: str) -> Device:
    if kind == "cpu":
        return "cpu"
    if kind in _accelerator_types():
        return f"{kind}:{int(index or 0)}"
    raise PlanError(f"Unknown device {raw!r}: use {_FORMS} [{PlanError.code}].")


def is_accelerator(device: Device) -> bool:
    """Whether a normalised device runs modules besides the CPU (not ``cpu``, not ``disk``)."""
    return device not in ("cpu", "disk")


def accelerate_device(device: Device) -> int | str:
    """A normalised device as accelerate and transformers write it in a device map (and in
    ``model.hf_device_map``): an accelerator index as an ``int`` (``"cuda:1"`` -> ``1``), except
    ``mps``, which has one device and is written ``"mps"``; ``"cpu"`` and ``"disk"`` as is."""
    if not is_accelerator(device):
        return device
    kind, _, index = device.partition(":")
    return kind if kind == "mps" else int(index)


def device_order(device: Device) -> tuple[int, int, str]:
    """Sort key of a normalised device: accelerators by index (``cuda:2`` before ``cuda:10``),
    then ``cpu``, then ``disk``."""
    if device == "disk":
        return (2, 0, "")
    if device == "cpu":
        return (1, 0, "")
    kind, _, index = device.partition(":")
    return (0, int(index) if index.isdigit() else 0, kind)


def sort_devices(devices: Iterable[Device]) -> list[Device]:
    """Normalised devices in plan order (see :func:`device_order`)."""
    return sorted(devices, key=device_order)


def parse_max_memory(value: str | Mapping[Any, int | str | None]) -> dict[Device, int | None]:
    """``"0=20GB,cpu=8GB,disk"`` or ``{0: "20GB", "cpu": 8 * 10**9, "disk": None}`` ->
    ``{device: bytes, or None for unlimited}``, in plan order (see :func:`device_order`).

    Devices are normalised (:func:`normalize_device`); sizes are bytes or strings for
    :func:`~bigmodel.foundations.units.parse_size`. Only ``disk`` may be unlimited (``None``,
    or no ``=SIZE`` in the string form). Raises ``ValueError`` naming the device or value at
    fault, the rule, and how to write it instead.
    """
    items: list[tuple[object, object]]
    if isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, amount = part.partition("=")
            items.append((name.strip(), amount.strip() if sep else None))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(
            f"max_memory {value!r} of type {type(value).__name__} is not a budget: "
            "pass a dict {device: size} or a string like '0=20GB,cpu=8GB,disk'."
        )
    budgets: dict[Device, int | None] = {}
    for raw_device, size in items:
        device = _budget_device(raw_device)
        if device in budgets:
            raise ValueError(
                f"max_memory names {device!r} twice (as {raw_device!r} too): give each device "
                "one size."
            )
        budgets[device] = _budget_size(raw_device, device, size)
    if not budgets:
        raise ValueError(
            f"max_memory {value!r} names no device: give at least one, e.g. 'cpu=8GB,disk'."
        )
    return {device: budgets[device] for device in sort_devices(budgets)}


def _budget_device(raw: object) -> Device:
    unknown = f"Unknown device {raw!r} in max_memory: use {_FORMS} [{PlanError.code}]."
    if not isinstance(raw, (str, int, torch.device)):
        raise PlanError(unknown)
    try:
        return normalize_device(raw)
    except PlanError:
        raise PlanError(unknown) from None


def _budget_size(raw_device: object, device: Device, size: object) -> int | None:
    if size is None or size == "":
        if device == "disk":
            return None
        raise ValueError(
            f"max_memory for {raw_device!r} has no size: only 'disk' may be unlimited, since "
            f"a plan would otherwise put more on {device} than it holds. "
            f"Give a size, e.g. {raw_device}=8GB."
        )
    if not isinstance(size, (int, str)):
        raise ValueError(
            f"max_memory for {raw_device!r} is {size!r}: a size is a number of bytes or a "
            "string like '8GB'."
        )
    try:
        return parse_size(size)
    except ValueError as exc:
        raise ValueError(f"max_memory for {raw_device!r}: {exc}") from None


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


def planning_budgets(
    max_memory: str | Mapping[Any, int | str | None] | None, *, reserve: float = 0.1
) -> tuple[dict[Device, int | None], bool]:
    """The budgets a plan fills, and whether ``disk`` was added because ``max_memory`` did not
    name it. Without ``max_memory``: :func:`default_max_memory`. A ``max_memory`` without
    ``disk`` plans the rest on unlimited disk, as accelerate does (the caller warns with the
    bytes sent there); ``"disk": 0`` forbids disk, and a size bounds it."""
    if max_memory is None:
        return default_max_memory(reserve=reserve), False
    budgets = parse_max_memory(max_memory)
    if "disk" in budgets:
        return budgets, False
    return {**budgets, "disk": None}, True
