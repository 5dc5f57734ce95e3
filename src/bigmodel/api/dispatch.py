"""``dispatch_model``: place an already-loaded model by a device map, offloading what goes to disk."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import offload_state
from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.types import OffloadOptions
from bigmodel.placement.device_map import device_for, execution_device

__all__ = ["dispatch_model"]


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, str | int],
    *,
    offload_folder: str | os.PathLike[str] | None = None,
    offload: OffloadOptions | None = None,
) -> nn.Module:
    """Place an already-loaded model by ``device_map``: modules on an accelerator or ``cpu`` are
    moved there; modules on ``disk`` are written once into ``offload_folder`` (a temporary
    folder by default) and released, then brought back just for their forward. ``offload``
    (:class:`~bigmodel.OffloadOptions`) says where offloaded modules run (default: the first
    accelerator in the map, else ``cpu``) and how far reads run ahead; outputs come back to
    the device of the inputs."""
    offload = offload or OffloadOptions()
    resolved = {k: normalize_device(v) for k, v in device_map.items()}
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
    return model
