"""Placement hooks: each device-map entry receives its inputs on the device it runs on, and the
model's outputs come back to the device of the caller's inputs.

Needed whenever a device map involves more than the CPU; independent of offload (which
brings weights in and out, see :mod:`bigmodel.execution.offload`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigmodel.foundations.devices import normalize_device

__all__ = ["attach_placement_hooks", "has_forward", "move_to"]


def has_forward(module: nn.Module) -> bool:
    """Whether ``module`` defines a forward (a ``ModuleList`` or ``ModuleDict`` does not: its
    hooks never fire; its children are called one by one)."""
    return type(module).forward is not nn.Module.forward


def _called_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` if it has a forward, else the first modules with one below it."""
    if has_forward(module):
        return [module]
    return [m for child in module.children() for m in _called_modules(child)]


def move_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple):
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*(move_to(v, device) for v in value))
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return type(value)((k, move_to(v, device)) for k, v in value.items())
    return value


def _first_device(value: Any) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, (tuple, list, dict)):
        for item in items:
            found = _first_device(item)
            if found is not None:
                return found
    return None


def attach_placement_hooks(
    model: nn.Module, device_map: Mapping[str, str], execution: torch.device
) -> list[RemovableHandle]:
    """Move each entry's inputs to where it runs, and the outputs back to the caller's device.

    An entry without a forward of its own (a ``ModuleList``) hooks the modules under it that
    are called; an entry naming a tensor adds no hook. Needed only when the map involves more
    than the CPU; returns no hooks otherwise.
    """
    devices = {normalize_device(execution)} | {d for d in device_map.values() if d != "disk"}
    if devices <= {"cpu"}:
        return []
    handles: list[RemovableHandle] = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, device in device_map.items():
        if key not in modules:  # an entry naming a tensor: its module's inputs are its own
            continue
        target = torch.device(execution if device in ("disk", "cpu") else device)
        for module in _called_modules(modules[key]):
            handles.append(module.register_forward_pre_hook(_inputs_to(target), with_kwargs=True))
    callers: list[torch.device | None] = []

    def remember(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        callers.append(_first_device((args, kwargs)))

    def give_back(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        caller = callers.pop() if callers else None
        return output if caller is None else move_to(output, caller)

    # prepend: the caller's device is recorded before any hook moves the inputs
    handles.append(model.register_forward_pre_hook(remember, with_kwargs=True, prepend=True))
    handles.append(model.register_forward_hook(give_back))
    return handles


def _inputs_to(device: torch.device) -> Callable[..., Any]:
    def hook(
        mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return move_to(args, device), move_to(kwargs, device)

    return hook
