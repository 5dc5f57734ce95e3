"""accelerate's tensor helpers: ``find_tied_parameters``, ``retie_parameters`` and
``set_module_tensor_to_device``. Pure torch: they touch one module's tensors, nothing else of
bigmodel is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.dtypes import parse_dtype

__all__ = [
    "find_tied_parameters",
    "owner",
    "retie_parameters",
    "set_module_tensor_to_device",
]


def find_tied_parameters(model: nn.Module, **kwargs: object) -> list[list[str]]:
    """Names of parameters that are one tensor, one sorted list per tensor (only tensors with
    more than one name), as accelerate returns them. ``kwargs`` is accepted for accelerate's
    signature and ignored."""
    del kwargs
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding tensor ``name`` (dotted, from ``model``) and the tensor's own name."""
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def retie_parameters(model: nn.Module, tied_params: Sequence[Sequence[str]]) -> None:
    """Make every name of each group (as :func:`find_tied_parameters` lists them) one parameter
    again, the first of the group that is not on ``meta`` (a group all on ``meta`` is left as
    it is); undoes what moving or hooking may have untied."""
    for group in tied_params:
        located = [owner(model, name) for name in group]
        keep = next(
            (
                getattr(module, leaf)
                for module, leaf in located
                if getattr(module, leaf).device.type != "meta"
            ),
            None,
        )
        if keep is not None:
            for module, leaf in located:
                setattr(module, leaf, keep)


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _new_value(
    old: torch.Tensor,
    device: str,
    value: torch.Tensor | None,
    dtype: torch.dtype | None,
    non_blocking: bool,
) -> torch.Tensor:
    if value is None:
        moved = old.detach().to(device, non_blocking=non_blocking)
        if dtype is not None and device == "meta" and not _is_integer(old.dtype):
            moved = moved.to(dtype)
        return moved
    if dtype is None:
        value = value.to(old.dtype)
    elif not _is_integer(value.dtype):
        value = value.to(dtype)
    return value.detach().to(device, non_blocking=non_blocking)


def _check(module: nn.Module, leaf: str, name: str, value: torch.Tensor | None) -> None:
    if leaf not in module._parameters and leaf not in module._buffers:
        raise ValueError(
            f"{type(module).__name__} has no parameter or buffer {leaf!r} (from {name!r}): "
            "name a tensor of the module, e.g. 'layer.weight'."
        )
    old = getattr(module, leaf)
    if value is not None and tuple(old.shape) != tuple(value.shape):
        raise ValueError(
            f"Trying to set a tensor of shape {tuple(value.shape)} in {name!r} (which has "
            f"shape {tuple(old.shape)}): the value does not belong to this tensor."
        )


def set_module_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: int | str | torch.device,
    value: torch.Tensor | None = None,
    dtype: str | torch.dtype | None = None,
    fp16_statistics: torch.Tensor | None = None,
    tied_params_map: dict[int, dict[str, torch.Tensor]] | None = None,
    non_blocking: bool = False,
    clear_cache: bool = True,
) -> None:
    """Put the parameter or buffer ``tensor_name`` (dotted, from ``module``) on ``device``,
    with ``value`` if given (needed to leave ``meta``), as accelerate does: ``value`` is cast
    to ``dtype`` if given (integer and bool values keep theirs), else to the tensor's current
    dtype; a parameter keeps its class and ``requires_grad``. ``tied_params_map`` (data
    pointer -> {device: tensor}) reuses a tensor already placed on ``device`` for the same data.
    Raises ``ValueError`` for an unknown name, a shape mismatch or ``meta`` without a value.

    Differs from accelerate: quantized parameter classes (bitsandbytes) and
    ``fp16_statistics`` are not supported; ``clear_cache`` is accepted and ignored."""
    del clear_cache
    if fp16_statistics is not None:
        raise ValueError(
            "set_module_tensor_to_device: fp16_statistics (bitsandbytes 8-bit weights) is not "
            "supported by bigmodel.accelerate; use accelerate itself for quantized weights."
        )
    owning, leaf = owner(module, tensor_name)
    _check(owning, leaf, tensor_name, value)
    target = "meta" if str(device) == "meta" else normalize_device(device)
    old = getattr(owning, leaf)
    source = value if value is not None else old
    reused = _tied(tied_params_map, source, target)
    if reused is not None:
        owning._parameters[leaf] = reused  # type: ignore[assignment]
        return
    if old.device.type == "meta" and target != "meta" and value is None:
        raise ValueError(f"{tensor_name} is on the meta device: pass value= to put it on {target}.")
    new = _new_value(
        old, target, value, parse_dtype(dtype) if isinstance(dtype, str) else dtype, non_blocking
    )
    if leaf in owning._buffers:
        owning._buffers[leaf] = new
    else:
        param = owning._parameters[leaf]
        kind = type(param) if param is not None else nn.Parameter
        owning._parameters[leaf] = kind(new, requires_grad=old.requires_grad)
    if tied_params_map is not None and source.data_ptr() in tied_params_map:
        tied_params_map[source.data_ptr()].setdefault(target, getattr(owning, leaf))


def _tied(
    tied_params_map: Mapping[int, Mapping[str, torch.Tensor]] | None,
    source: torch.Tensor,
    device: str,
) -> torch.Tensor | None:
    if tied_params_map is None or source.device.type == "meta":
        return None
    return tied_params_map.get(source.data_ptr(), {}).get(device)
