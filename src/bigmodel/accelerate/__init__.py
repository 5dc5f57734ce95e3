"""A drop-in for accelerate's big-model API: change ``from accelerate import ...`` (or
``from accelerate.utils import ...``) to ``from bigmodel.accelerate import ...``.

Each function keeps accelerate's name, parameters, defaults, return shape and warnings, and
runs on bigmodel's engine (the one planner, the loader, the offload hooks): weights go from
the file straight into place, ``disk`` modules are read from the checkpoint itself (the next
block read ahead where that costs no budget), and every memory budget is kept.

Where the behaviour differs from accelerate's, on purpose (each function's docstring says more):

* Plans (:func:`infer_auto_device_map`) come from bigmodel's planner, with its headroom: the
  accelerator that runs the blocks kept on ``cpu``/``disk`` keeps room for the largest block
  actually streamed to it (accelerate: the largest block not yet placed); no room is kept on
  ``cpu`` for ``disk`` blocks, which are read from the file mapping, outside the CPU budget
  (accelerate keeps one there, so a ``cpu`` budget holds one block more than accelerate's). A
  block that does not fit on a device does not close it to later blocks that fit
  (accelerate's ``fallback_allocation=True``, always); tied tensors are charged once; a block
  that fits nowhere raises :class:`~bigmodel.PlanError` instead of a map that overruns a
  budget; a warning gives the bytes sent to a ``disk`` the budgets did not name. Without
  ``max_memory``, every device keeps 10% free.
* Sizes (:func:`compute_module_sizes`) are those of the dtype the load produces, upcasts too.
* Loads (:func:`load_checkpoint_in_model`) leave a model that runs; missing weights are
  initialised by their modules and named in a warning (accelerate leaves them on ``meta``
  under a device map); safetensors is preferred over ``pytorch_model.bin``; ``offload_folder``
  / ``offload_dir`` may be omitted (a temporary folder); ``strict=True`` raises
  :class:`~bigmodel.LoadStateDictError`, a ``RuntimeError`` as torch's.
* Hooks are bigmodel's: the next block is read ahead where that costs no budget (the CPU
  runs the offloaded blocks); on an accelerator each block is read when it runs, since the
  plans keep room there for one (for read-ahead on an accelerator, load with
  :func:`bigmodel.load_checkpoint` and ``OffloadOptions(prefetch=...)``, whose plan keeps room
  for it). ``model.hf_device_map`` writes every device one way (accelerator indexes as
  integers, ``"cpu"``, ``"disk"``; accelerate keeps the values as given). No ``_hf_hook``
  attributes; :func:`remove_hook_from_submodules` removes them and reads offloaded weights
  back onto the CPU; whole-model offload (:func:`cpu_offload`, :func:`disk_offload`) works
  block by block, not leaf module by leaf module; each device-map entry is materialised whole
  before it runs, so ``preload_module_classes`` is accepted for compatibility.
* Not supported, refused with a message: bitsandbytes 8-bit offload, accelerate's own offload
  index (``offload_index``), ``fp16_statistics``.
* Sizes as strings go through :func:`bigmodel.parse_size` (``"5GB"`` is 5 * 10**9 bytes,
  ``"5GiB"`` 5 * 2**30; accelerate reads lowercase ``"5gb"`` as gigabits).

bigmodel's own API (:func:`bigmodel.infer_device_map`, :func:`bigmodel.load_checkpoint`, ...)
keeps its defaults (detected no-split blocks, ``strict=True``, ``"cuda:0"`` device names); this
module is for code written against accelerate.
"""

from __future__ import annotations

from bigmodel.accelerate.construction import init_empty_weights, init_on_device
from bigmodel.accelerate.dispatching import cpu_offload, disk_offload, dispatch_model
from bigmodel.accelerate.hooks import (
    UserCpuOffloadHook,
    align_module_device,
    cpu_offload_with_hook,
    get_state_dict_offloaded_model,
    remove_hook_from_submodules,
)
from bigmodel.accelerate.loading import load_checkpoint_and_dispatch, load_checkpoint_in_model
from bigmodel.accelerate.planning import (
    compute_module_sizes,
    get_balanced_memory,
    infer_auto_device_map,
)
from bigmodel.accelerate.tensors import (
    find_tied_parameters,
    retie_parameters,
    set_module_tensor_to_device,
)

__all__ = [
    "UserCpuOffloadHook",
    "align_module_device",
    "compute_module_sizes",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "find_tied_parameters",
    "get_balanced_memory",
    "get_state_dict_offloaded_model",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "remove_hook_from_submodules",
    "retie_parameters",
    "set_module_tensor_to_device",
]
