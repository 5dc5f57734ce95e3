"""Where and as what each loaded tensor ends up, and putting it into the module.

:class:`Placement` answers, for one module name, the final dtype (``dtype``, per-module
overrides, integer tensors untouched) and device (``device``, or the device map, where
``disk`` entries are read on demand by the offload hooks). :func:`place` assigns a new tensor
under every name that shares it (tied weights stay one ``Parameter``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bigmodel.placement.device_map import device_for

__all__ = ["DtypeOverrides", "Placement", "keep_in_fp32", "like", "place", "set_tensor"]

#: Per-module dtype overrides: a module class, or a dotted module name (matched on dot boundaries).
DtypeOverrides = Mapping[str | type[nn.Module], torch.dtype]


@dataclass(frozen=True)
class Placement:
    """Where each tensor of one load ends up, and as what dtype."""

    dtype: torch.dtype | None
    overrides: DtypeOverrides
    device: torch.device | None
    model: nn.Module
    device_map: Mapping[str, str] | None = None
    #: Tensors whose name this matches stay float32 (see :func:`keep_in_fp32`).
    keep_fp32: re.Pattern[str] | None = None

    def dtype_for(self, name: str, current: torch.Tensor) -> torch.dtype:
        """Floating-point tensors take ``dtype`` (or a per-module override, or float32 where the
        model keeps them so); others keep the module's."""
        if not current.dtype.is_floating_point or (self.dtype is None and not self.overrides):
            return current.dtype
        owner = name.rpartition(".")[0]
        module = self.model.get_submodule(owner)
        for selector, dtype in self.overrides.items():
            if isinstance(selector, str):
                if owner == selector or owner.startswith(selector + ".") or selector == "":
                    return dtype
            elif isinstance(module, selector):
                return dtype
        if self.keep_fp32 is not None and self.keep_fp32.search(name):
            return torch.float32
        return self.dtype if self.dtype is not None else current.dtype

    def device_for(self, name: str, current: torch.Tensor) -> torch.device:
        if self.device_map is not None:
            mapped = device_for(name, self.device_map)
            if mapped is None:
                raise ValueError(
                    f"The device map places no entry over {name!r}; add it (or an ancestor module, or '') to device_map."
                )
            return torch.device("cpu" if mapped == "disk" else mapped)
        if self.device is not None:
            return self.device
        return torch.device("cpu") if current.is_meta else current.device

    def offloaded(self, name: str) -> bool:
        return self.device_map is not None and device_for(name, self.device_map) == "disk"


def keep_in_fp32(model: nn.Module, dtype: torch.dtype | None) -> re.Pattern[str] | None:
    """The tensors ``model`` keeps in float32 when loaded as ``dtype``, as transformers models
    declare them (read from the instance: no import of transformers): ``_keep_in_fp32_modules``
    when loading as float16, ``_keep_in_fp32_modules_strict`` as float16 or bfloat16. The
    entries are patterns searched in tensor names (``*`` is any text), as transformers does."""
    patterns: set[str] = set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(patterns)))


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    else:
        module._buffers[leaf] = value


def like(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as the kind of tensor ``old`` was: a Parameter (same ``requires_grad``) or not."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(value, requires_grad=old.requires_grad)
    return value


def place(model: nn.Module, names: list[str], old: torch.Tensor, value: torch.Tensor) -> None:
    """Assign ``value`` under every name in ``names``; a Parameter stays a Parameter."""
    new = like(old, value)
    for name in names:
        set_tensor(model, name, new)
