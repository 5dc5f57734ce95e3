"""bigmodel's hooks seen through accelerate's hook helpers.

A model dispatched by bigmodel carries its :class:`~bigmodel.execution.offload.Offloader` as
``model._bigmodel_offloader`` (the offloaded tensors, each with where its data comes from) and
its placement hooks as ``model._bigmodel_placement_hooks``; accelerate's functions that look at
hooks are answered from those: ``remove_hook_from_submodules`` removes them and puts every
offloaded tensor back on the CPU (a usable model, as accelerate restores one);
``align_module_device`` materialises one module's offloaded tensors for the span of a
``with``; ``get_state_dict_offloaded_model`` reads every offloaded tensor back; and
``cpu_offload_with_hook`` attaches a whole-model hook that ``remove_hook_from_submodules``
also removes. Modules of a model dispatched through :mod:`bigmodel.accelerate` remember their
root (:func:`register`), so that ``align_module_device`` works on a submodule.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bigmodel.accelerate.tensors import owner
from bigmodel.execution.hooks import move_to
from bigmodel.execution.offload import Offloader
from bigmodel.execution.offload_sources import OffloadedTensor
from bigmodel.foundations.devices import normalize_device

__all__ = [
    "UserCpuOffloadHook",
    "align_module_device",
    "cpu_offload_with_hook",
    "first_device",
    "get_state_dict_offloaded_model",
    "materialize",
    "register",
    "remove_hook_from_submodules",
    "take_over",
]

_HANDLES = "_bigmodel_accelerate_handles"

#: submodule -> (its root model, its name in the root), for models dispatched here.
_ROOTS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[nn.Module], str]] = (
    weakref.WeakKeyDictionary()
)


def register(model: nn.Module) -> None:
    """Remember, for each module of ``model``, that ``model`` is its root (see the docstring)."""
    root = weakref.ref(model)
    for name, module in model.named_modules(remove_duplicate=False):
        _ROOTS[module] = (root, name)


def _offloader(model: nn.Module) -> Offloader | None:
    """The :class:`~bigmodel.execution.offload.Offloader` the engine keeps on ``model``."""
    offloader = model.__dict__.get("_bigmodel_offloader")
    return offloader if isinstance(offloader, Offloader) else None


def take_over(model: nn.Module) -> dict[str, OffloadedTensor]:
    """Remove bigmodel's hooks from ``model`` and return its offloaded tensors (still ``meta``
    in the model), so that they can be re-hooked or put back."""
    offloader = _offloader(model)
    for handle in getattr(model, "_bigmodel_placement_hooks", None) or []:
        handle.remove()
    specs: dict[str, OffloadedTensor] = {}
    if offloader is not None:
        specs = dict(offloader.tensors)
        offloader.remove()
    for attribute in ("_bigmodel_offloader", "_bigmodel_placement_hooks"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return specs


def _load(spec: OffloadedTensor, device: str | torch.device) -> torch.Tensor:
    return spec.load().to(device=device, dtype=spec.dtype)


def materialize(
    model: nn.Module, specs: Mapping[str, OffloadedTensor], device_of: Mapping[str, str]
) -> None:
    """Put each offloaded tensor of ``specs`` back into ``model`` on ``device_of[name]``,
    tied names (one source) as one tensor."""
    made: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
    for name, spec in specs.items():
        device = device_of[name]
        key = (spec.source or name, spec.dtype, device)
        if key not in made:
            made[key] = _load(spec, device)
        module, leaf = owner(model, name)
        if spec.is_parameter:
            module._parameters[leaf] = nn.Parameter(made[key], requires_grad=spec.requires_grad)
        else:
            module._buffers[leaf] = made[key]
    if any(spec.is_parameter for spec in specs.values()):
        _retie_same_source(model, specs, device_of)


def _retie_same_source(
    model: nn.Module, specs: Mapping[str, OffloadedTensor], device_of: Mapping[str, str]
) -> None:
    """Names of one source and device become one Parameter object again (tied weights)."""
    first: dict[tuple[str, str], nn.Parameter] = {}
    for name, spec in specs.items():
        if not spec.is_parameter:
            continue
        module, leaf = owner(model, name)
        param = module._parameters[leaf]
        assert isinstance(param, nn.Parameter)
        kept = first.setdefault((spec.source or name, device_of[name]), param)
        module._parameters[leaf] = kept


def _remove_accelerate_hook(module: nn.Module) -> None:
    """What accelerate's ``remove_hook_from_module`` does, for hooks accelerate attached."""
    hook = module.__dict__.pop("_hf_hook", None)
    if hook is not None and hasattr(hook, "detach_hook"):
        hook.detach_hook(module)
    old_forward = module.__dict__.pop("_old_forward", None)
    if old_forward is not None:
        module.forward = old_forward


def remove_hook_from_submodules(module: nn.Module) -> None:
    """Remove every hook bigmodel (or accelerate) attached to ``module`` and its submodules.

    Tensors bigmodel offloaded (to disk, or kept on the CPU for an accelerator) are put back
    on the CPU, read from where the hooks read them, so the model runs without hooks; modules
    placed on an accelerator stay there. ``hf_device_map`` is kept, as accelerate keeps it."""
    for sub in module.modules():
        if "_bigmodel_offloader" in sub.__dict__ or "_bigmodel_placement_hooks" in sub.__dict__:
            specs = take_over(sub)
            materialize(sub, specs, dict.fromkeys(specs, "cpu"))
        for handle in sub.__dict__.pop(_HANDLES, []):
            handle.remove()
        _remove_accelerate_hook(sub)


# -- reading offloaded tensors --------------------------------------------------------------


def _offloaded(module: nn.Module) -> tuple[Offloader | None, dict[str, OffloadedTensor]]:
    """The Offloader responsible for ``module`` and ``{leaf: spec}`` of its own tensors."""
    offloader, prefix = _offloader(module), ""
    if offloader is None:
        entry = _ROOTS.get(module)
        root = entry[0]() if entry is not None else None
        offloader = None if root is None else _offloader(root)
        if offloader is None or entry is None:
            return None, {}
        prefix = entry[1]
    dotted = f"{prefix}." if prefix else ""
    own = {
        name[len(dotted) :]: spec
        for name, spec in offloader.tensors.items()
        if name.startswith(dotted) and "." not in name[len(dotted) :]
    }
    return offloader, own


@contextlib.contextmanager
def align_module_device(
    module: nn.Module, execution_device: int | str | torch.device | None = None
) -> Iterator[None]:
    """Within the ``with``, the module's own tensors are real: offloaded ones are read onto
    ``execution_device`` (default: where its offload hooks run it) and released after; a
    module that is not offloaded has its parameters moved to ``execution_device`` and back
    (nothing happens without one), as accelerate's context manager does."""
    offloader, own = _offloaded(module)
    if offloader is not None and own:
        device = (
            offloader.execution_device
            if execution_device is None
            else torch.device(normalize_device(execution_device))
        )
        placeholders = {leaf: getattr(module, leaf) for leaf in own}
        try:
            for leaf, spec in own.items():
                _put(module, leaf, _load(spec, device), spec.is_parameter, spec.requires_grad)
            yield
        finally:
            for leaf, spec in own.items():
                _put(module, leaf, placeholders[leaf], spec.is_parameter, spec.requires_grad)
        return
    if execution_device is None:
        yield
        return
    target = normalize_device(execution_device)
    before = {name: p for name, p in module.named_parameters(recurse=False)}
    try:
        for name, param in before.items():
            _put(module, name, param.detach().to(target), True, param.requires_grad)
        yield
    finally:
        for name, param in before.items():
            module._parameters[name] = param


def _put(
    module: nn.Module, leaf: str, tensor: torch.Tensor, is_parameter: bool, requires_grad: bool
) -> None:
    if is_parameter:
        module._parameters[leaf] = (
            tensor
            if isinstance(tensor, nn.Parameter)
            else nn.Parameter(tensor, requires_grad=requires_grad)
        )
    else:
        module._buffers[leaf] = tensor


def get_state_dict_offloaded_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, offloaded tensors read back from their source (each
    source once), as accelerate returns it; tensors still on ``meta`` with no source are left
    out with a warning naming them.

    Differs from accelerate: the root module's own tensors are included (accelerate skips
    them)."""
    offloader = _offloader(model)
    specs: Mapping[str, OffloadedTensor] = {} if offloader is None else offloader.tensors
    made: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for name, tensor in model.state_dict().items():
        spec = specs.get(name)
        if spec is not None:
            key = (spec.source or name, spec.dtype)
            if key not in made:
                made[key] = _load(spec, "cpu")
            state[name] = made[key]
        elif tensor.device.type == "meta":
            left_out.append(name)
        else:
            state[name] = tensor.to("cpu")
    if left_out:
        warnings.warn(
            f"These tensors were left out of the state dict because they are on the meta "
            f"device with nothing to read them from: {left_out}",
            stacklevel=2,
        )
    return state


# -- cpu_offload_with_hook --------------------------------------------------------------------


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class _CpuOffload:
    """The whole-model hook: the model waits on the CPU and moves to ``execution_device`` at its
    forward (after offloading the previous model of a pipeline), where it then stays."""

    def __init__(
        self,
        execution_device: int | str | torch.device | None,
        prev_module_hook: UserCpuOffloadHook | None,
    ) -> None:
        self.execution_device = (
            _default_device()
            if execution_device is None
            else torch.device(normalize_device(execution_device))
        )
        self.prev_module_hook = prev_module_hook

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module.to("cpu")

    def pre_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        previous = self.prev_module_hook
        if previous is not None and first_device(previous.model) != torch.device("cpu"):
            previous.offload()
        if first_device(module) != self.execution_device:
            module.to(self.execution_device)
        return move_to(args, self.execution_device), move_to(kwargs, self.execution_device)


def first_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (``cpu`` without one, or on ``meta``)."""
    first = next(iter(module.parameters()), None)
    return torch.device("cpu") if first is None or first.is_meta else first.device


class UserCpuOffloadHook:
    """What :func:`cpu_offload_with_hook` returns: ``offload()`` sends the model back to the
    CPU; ``remove()`` takes the hook off."""

    def __init__(self, model: nn.Module, hook: _CpuOffload, handle: RemovableHandle) -> None:
        self.model = model
        self.hook = hook
        self._handle = handle

    def offload(self) -> None:
        self.hook.init_hook(self.model)

    def remove(self) -> None:
        self._handle.remove()


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: int | str | torch.device | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Keep ``model`` on the CPU until its forward, then move it whole to
    ``execution_device`` (default: the first accelerator, else ``cpu``) and leave it there
    until ``hook.offload()``; ``prev_module_hook`` (the hook of the previous model of a
    pipeline) is offloaded first. Returns ``(model, hook)``, as accelerate does."""
    hook = _CpuOffload(execution_device, prev_module_hook)
    hook.init_hook(model)
    handle = model.register_forward_pre_hook(hook.pre_forward, with_kwargs=True)
    model.__dict__.setdefault(_HANDLES, []).append(handle)
    return model, UserCpuOffloadHook(model, hook, handle)
