"""accelerate's ``dispatch_model``, ``cpu_offload`` and ``disk_offload`` on bigmodel's offload
hooks (:mod:`bigmodel.execution.offload`): the device map is accelerate's, the machinery that
moves the weights is bigmodel's (reads from the file mapping, prefetch of the next entries, one
pass over tied weights).

The hooks read the next blocks ahead (``OffloadOptions.prefetch``) where that costs no budget:
when the CPU runs the streamed blocks (their pages come from the file mapping). On an
accelerator each block is read when it runs, since the plans of :func:`infer_auto_device_map`
keep room there for one streamed block, as accelerate's do
(:data:`~bigmodel.accelerate.planning.PLANNED_PREFETCH`).

A model that already carries bigmodel's hooks (loaded with a device map, or dispatched before)
is taken over: tensors already offloaded stay where they are read from if the new map keeps
them on disk, and are read back onto their new device otherwise; nothing is written twice.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from bigmodel.accelerate.hooks import first_device, materialize, register, take_over
from bigmodel.accelerate.planning import PLANNED_PREFETCH
from bigmodel.accelerate.tensors import owner
from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import OffloadedTensor, offload_state
from bigmodel.foundations.devices import Device, is_accelerator
from bigmodel.placement.device_map import (
    covering_key,
    device_for,
    execution_device,
    normalize_device_map,
    set_hf_device_map,
)
from bigmodel.placement.planner import PlanNode, repeated_block_classes, tree_from_module

__all__ = ["cpu_offload", "disk_offload", "dispatch_model", "dispatch_resolved"]

DeviceMap = Mapping[str, int | str | torch.device]


def _check_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> None:
    """accelerate's checks: keys naming no module are warned about; a tensor no key covers is
    a ``ValueError`` naming it."""
    modules = dict(model.named_modules())
    unknown = [k for k in device_map if k and k not in modules and not _is_tensor(model, k)]
    if unknown:
        warnings.warn(
            f"The following device_map keys do not match any submodules in the model: {unknown}",
            UserWarning,
            stacklevel=3,
        )
    uncovered = [n for n in model.state_dict() if covering_key(n, device_map) is None]
    if uncovered:
        raise ValueError(
            f"The device_map provided does not give any device for the following parameters: "
            f"{', '.join(uncovered)}. Add them (or a module holding them, or '') to device_map."
        )


def _is_tensor(model: nn.Module, name: str) -> bool:
    try:
        module, leaf = owner(model, name)
    except AttributeError:
        return False
    return leaf in module._parameters or leaf in module._buffers


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param, True
    for name, buffer in model.named_buffers(remove_duplicate=False):
        yield name, buffer, False


def _place(model: nn.Module, device_map: Mapping[str, Device], skip: set[str]) -> None:
    """Move every real tensor to its entry's device (``disk`` ones stay on the CPU for now);
    tied names move once and stay one tensor."""
    moved: dict[int, torch.Tensor] = {}
    for name, tensor, is_parameter in _named_tensors(model):
        device = device_for(name, device_map) or "cpu"
        device = "cpu" if device == "disk" else device
        if name in skip or tensor.device.type == "meta" or tensor.device == torch.device(device):
            continue
        if id(tensor) not in moved:
            data = tensor.detach().to(device)
            moved[id(tensor)] = (
                nn.Parameter(data, requires_grad=tensor.requires_grad) if is_parameter else data
            )
        module, leaf = owner(model, name)
        if is_parameter:
            module._parameters[leaf] = moved[id(tensor)]  # type: ignore[assignment]
        else:
            module._buffers[leaf] = moved[id(tensor)]


def _fill_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """accelerate's ``state_dict=``: values for tensors still on ``meta``."""
    for name, tensor, is_parameter in _named_tensors(model):
        if tensor.device.type == "meta" and name in state_dict:
            module, leaf = owner(model, name)
            value = state_dict[name].to(tensor.dtype)
            if is_parameter:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=tensor.requires_grad)
            else:
                module._buffers[leaf] = value


def _split_kept(
    specs: Mapping[str, OffloadedTensor],
    device_map: Mapping[str, Device],
    offload_buffers: bool,
    execution: Device,
) -> tuple[dict[str, OffloadedTensor], dict[str, str]]:
    """Of tensors offloaded before: those that stay on disk, and where the others go back."""
    kept: dict[str, OffloadedTensor] = {}
    back: dict[str, str] = {}
    for name, spec in specs.items():
        device = device_for(name, device_map) or "cpu"
        if device == "disk" and (offload_buffers or spec.is_parameter):
            kept[name] = spec
        else:
            back[name] = execution if device == "disk" else device
    return kept, back


def _buffers_to(
    model: nn.Module, device_map: Mapping[str, Device], execution: Device, offloaded: set[str]
) -> None:
    """accelerate's rule for buffers that are not offloaded: those of modules kept on
    ``cpu``/``disk`` live on the execution device."""
    if execution == "cpu":
        return
    for name, buffer in model.named_buffers(remove_duplicate=False):
        device = device_for(name, device_map)
        if name not in offloaded and device in ("cpu", "disk") and buffer.device.type != "meta":
            module, leaf = owner(model, name)
            module._buffers[leaf] = buffer.to(execution)


def dispatch_resolved(
    model: nn.Module,
    device_map: Mapping[str, Device],
    *,
    main_device: int | str | torch.device | None,
    offload_dir: str | os.PathLike[str] | None,
    offload_buffers: bool,
    prefetch: bool | None = None,
) -> None:
    """Hook ``model`` up to a normalised device map (see the module docstring). ``prefetch``
    as :class:`~bigmodel.OffloadOptions` takes it; None: read ahead only where the CPU runs
    the streamed blocks (a map planned with room for one streamed block)."""
    execution = execution_device(device_map, main_device)
    if prefetch is None:
        prefetch = PLANNED_PREFETCH or not is_accelerator(execution)
    before = take_over(model)
    kept, back = _split_kept(before, device_map, offload_buffers, execution)
    materialize(model, {name: before[name] for name in back}, back)
    _place(model, device_map, skip=set(kept))
    state = model.state_dict(keep_vars=True)
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    disk = {
        name: tensor
        for name, tensor in state.items()
        if name not in kept
        and device_for(name, device_map) == "disk"
        and tensor.device.type != "meta"
        and (offload_buffers or name not in buffers)
    }
    _buffers_to(model, device_map, execution, set(disk) | set(kept))
    specs = kept | (offload_state(disk, offload_dir) if disk else {})
    attach_offload_hooks(model, specs, device_map, execution_device=execution, prefetch=prefetch)
    register(model)


def _single_device(model: nn.Module, device: Device) -> None:
    """accelerate's path for a map on one device without hooks: the model is moved there."""
    before = take_over(model)
    materialize(model, before, dict.fromkeys(before, device))
    model.to(device)


def dispatch_model(
    model: nn.Module,
    device_map: DeviceMap,
    main_device: int | str | torch.device | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    offload_index: Mapping[str, object] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """Place ``model`` by ``device_map`` (accelerate's values: ``0``, ``"cuda:1"``, ``"cpu"``,
    ``"disk"``) and hook it up to run: modules on ``disk`` are written once into
    ``offload_dir`` and read back just for their forward; with an accelerator, ``cpu``
    modules are copied to it for theirs; inputs follow each module and outputs come back to
    the caller's device. A map on one device without ``disk`` just moves the model there
    (unless ``force_hooks``). Sets ``model.hf_device_map`` (accelerator indexes as integers,
    see :func:`bigmodel.placement.device_map.set_hf_device_map`); returns the model.

    accelerate's checks are kept: a map key naming no module is warned about, a tensor no key
    covers is a ``ValueError``. ``state_dict`` gives values for tensors still on ``meta``.
    Buffers of offloaded modules stay resident on the execution device unless
    ``offload_buffers``.

    Differs from accelerate: ``offload_dir`` may be omitted (a temporary folder is used);
    ``offload_index`` (accelerate's own offload format) is not read; entries are materialised
    whole before they run, so ``preload_module_classes`` adds nothing and is accepted; inputs
    that are not tensors, tuples, lists or dicts (a transformers ``Cache``) are never moved,
    so ``skip_keys`` is accepted; ``model.to`` is not wrapped with accelerate's warning.
    """
    del skip_keys, preload_module_classes
    if offload_index is not None:
        raise ValueError(
            "dispatch_model(offload_index=...): bigmodel.accelerate does not read accelerate's "
            "offload index; pass the loaded model (or load it with load_checkpoint_in_model / "
            "load_checkpoint_and_dispatch, whose offloaded tensors are read from the checkpoint)."
        )
    resolved = normalize_device_map(device_map)
    _check_device_map(model, resolved)
    if state_dict is not None:
        _fill_from_state_dict(model, state_dict)
    devices = set(resolved.values())
    if len(devices) == 1 and "disk" not in devices and not force_hooks:
        _single_device(model, devices.pop())
    else:
        dispatch_resolved(
            model,
            resolved,
            main_device=main_device,
            offload_dir=offload_dir,
            offload_buffers=offload_buffers,
        )
    set_hf_device_map(model, resolved)
    return model


# -- whole-model offload ----------------------------------------------------------------------


def _entries(node: PlanNode) -> Iterator[str]:
    """Device-map keys for whole-model offload: each unsplittable module, and each split module
    that holds tensors of its own, parents before children."""
    for child in node.children:
        if not child.splittable:
            yield child.name
            continue
        if child.tensors:
            yield child.name
        yield from _entries(child)


def _offload_map(
    model: nn.Module, device: Device, preload_module_classes: Iterable[str] | None
) -> dict[str, Device]:
    """One entry per block (repeated blocks and ``preload_module_classes`` are not split)."""
    no_split: set[type[nn.Module] | str] = set(repeated_block_classes(model))
    no_split |= set(preload_module_classes or [])
    tree = tree_from_module(model, no_split_module_classes=no_split)
    if not tree.splittable:
        return {"": device}
    keys = ([""] if tree.tensors else []) + list(_entries(tree))
    return dict.fromkeys(keys, device)


def _offload_whole(
    model: nn.Module,
    device: Device,
    execution_device: int | str | torch.device | None,
    offload_dir: str | os.PathLike[str] | None,
    offload_buffers: bool,
    preload_module_classes: Iterable[str] | None,
) -> nn.Module:
    """Keep every block on ``device`` (``cpu``/``disk``) and run it on ``execution_device``
    (default: the device of the model's first parameter)."""
    dispatch_resolved(
        model,
        _offload_map(model, device, preload_module_classes),
        main_device=first_device(model) if execution_device is None else execution_device,
        offload_dir=offload_dir,
        offload_buffers=offload_buffers,
    )
    return model


def cpu_offload(
    model: nn.Module,
    execution_device: int | str | torch.device | None = None,
    offload_buffers: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    preload_module_classes: list[str] | None = None,
) -> nn.Module:
    """Keep every weight on the CPU and copy each block to ``execution_device`` (default: the
    device of the model's first parameter) just for its forward. On a CPU-only run the
    weights are already where they run, so nothing is copied.

    Differs from accelerate: blocks (repeated layers, ``preload_module_classes``) are the
    unit, not each leaf module (so an accelerator holds one block at a time)."""
    if state_dict is not None:
        _fill_from_state_dict(model, state_dict)
    return _offload_whole(
        model, "cpu", execution_device, None, offload_buffers, preload_module_classes
    )


def disk_offload(
    model: nn.Module,
    offload_dir: str | os.PathLike[str],
    execution_device: int | str | torch.device | None = None,
    offload_buffers: bool = False,
    preload_module_classes: list[str] | None = None,
) -> nn.Module:
    """Write every weight once into ``offload_dir`` and read each block from there onto
    ``execution_device`` (default: the device of the model's first parameter) just for its
    forward.

    Differs from accelerate: weights already offloaded by accelerate into ``offload_dir`` are
    not reused (bigmodel writes its own files there); blocks are the unit, and the next block
    is read ahead when the CPU runs them (see the module docstring)."""
    return _offload_whole(
        model, "disk", execution_device, offload_dir, offload_buffers, preload_module_classes
    )
