"""``dispatch_model``: place an already-loaded model by a device map, offloading what goes to disk."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import offload_state
from bigmodel.foundations.types import OffloadOptions
from bigmodel.placement.device_map import (
    device_for,
    execution_device,
    normalize_device_map,
    set_hf_device_map,
)

__all__ = ["dispatch_model"]


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, str | int | torch.device],
    *,
    offload_folder: str | os.PathLike[str] | None = None,
    offload: OffloadOptions | None = None,
) -> nn.Module:
    """Place an already-loaded model by ``device_map``: modules on an accelerator or ``cpu`` are
    moved there; modules on ``disk`` are written once into ``offload_folder`` (a temporary
    folder by default) and released, then brought back just for their forward. ``offload``
    (:class:`~bigmodel.OffloadOptions`) says where offloaded modules run (default: the first
    accelerator in the map, else ``cpu``) and how far reads run ahead; outputs come back to
    the device of the inputs. ``model.hf_device_map`` is set as accelerate's ``dispatch_model``
    sets it (accelerator indexes as ``int``)."""
    offload = offload or OffloadOptions()
    resolved = normalize_device_map(device_map)
    for key, device in resolved.items():
        if device != "disk":
            target = model.get_submodule(key) if key else model
            target.to(device)
    state = model.state_dict(keep_vars=True)
    disk = {name: tensor for name, tensor in state.items() if device_for(name, resolved) == "disk"}
    specs = offload_state(disk, offload_folder) if disk else {}
    attach_offload_hooks(
        model,
        specs,
        resolved,
        execution_device=execution_device(resolved, offload.main_device),
        prefetch=offload.prefetch,
    )
    set_hf_device_map(model, resolved)
    return model
