"""The one device vocabulary: device names, their order, and memory budgets per device.

A device is an accelerator (``"cuda:0"``, also written ``0``, ``"0"``, ``"cuda"`` or
``torch.device("cuda", 0)``), ``"cpu"`` or ``"disk"``. Devices are always ordered the same way:
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

from bigmodel.foundations.units import parse_size

__all__ = [
    "Device",
    "default_max_memory",
    "device_order",
    "normalize_device",
    "parse_max_memory",
    "sort_devices",
]

Device = str

_FORMS = "an accelerator index (0), 'cuda:0', 'cpu' or 'disk'"


def normalize_device(device: str | int | torch.device) -> Device:
    """``0`` / ``"0"`` / ``"cuda"`` / ``torch.device("cuda", 0)`` -> ``"cuda:0"``; ``"cpu"``
    (also ``"cpu:0"``) and ``"disk"`` as is; ``"<type>:<index>"`` for other accelerators."""
    if isinstance(device, torch.device):
        return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    if isinstance(device, bool):
        raise ValueError(f"Unknown device {device!r}: a boolean is not a device; use {_FORMS}.")
    text = str(device).strip()
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text in ("cpu", "disk"):
        return text
    if text == "cuda":
        return "cuda:0"
    kind, _, index = text.partition(":")
    if kind.isidentifier() and index.isdigit() and kind != "disk":
        return "cpu" if kind == "cpu" else f"{kind}:{int(index)}"
    raise ValueError(f"Unknown device {device!r}: use {_FORMS}.")


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
    if not isinstance(raw, (str, int, torch.device)):
        raise ValueError(f"Unknown device {raw!r} in max_memory: use {_FORMS}.")
    try:
        return normalize_device(raw)
    except ValueError:
        raise ValueError(f"Unknown device {raw!r} in max_memory: use {_FORMS}.") from None


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
