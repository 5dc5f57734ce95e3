"""What happens to each tensor of a model run with offload: streamed, moved once, or left alone.

One pure decision, on names and device strings only (so that it is tested for ``"cuda:0"``
without a GPU), made once when the hooks are attached:

* ``"stream"``: materialised on the execution device for each forward of its unit and released
  after (see :mod:`bigmodel.execution.offload`): every tensor with a disk source, and, when the
  execution device is an accelerator, the persistent tensors of ``cpu`` entries (the CPU copy
  is the source);
* ``"move"``: moved to the execution device once and kept there: when the execution device is
  an accelerator, the tensors of ``cpu`` and ``disk`` entries that have no source to stream
  from — non-persistent buffers (rotary ``inv_freq``, never in a checkpoint) and tensors the
  checkpoint lacked, which were initialised in memory. They are small and constant, and a
  module running on the accelerator must find them there (accelerate does the same);
* ``"stay"``: everything else — tensors of accelerator entries (placed by the load), and, with
  a ``cpu`` execution device, every tensor kept in memory.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Literal

from bigmodel.placement.device_map import device_for

__all__ = ["Role", "tensor_roles"]

Role = Literal["stream", "move", "stay"]


def tensor_roles(
    names: Iterable[str],
    device_map: Mapping[str, str],
    execution: str,
    *,
    offloaded: Collection[str],
    persistent: Collection[str],
) -> dict[str, Role]:
    """The :data:`Role` of each tensor name (see the module docstring).

    ``offloaded``: names with a disk source; ``persistent``: names in the model's
    ``state_dict`` (the others are non-persistent buffers); ``execution``: the device name
    offloaded modules run on (``"cpu"``, ``"cuda:0"``...)."""
    roles: dict[str, Role] = {}
    on_cpu = execution == "cpu"
    for name in names:
        device = device_for(name, device_map)
        if name in offloaded:
            roles[name] = "stream"
        elif device not in ("cpu", "disk") or on_cpu:
            roles[name] = "stay"
        elif device == "cpu" and name in persistent:
            roles[name] = "stream"
        else:
            roles[name] = "move"
    return roles
