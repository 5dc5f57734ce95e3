"""Build modules without allocating or initialising their weights.

Under :func:`init_empty_weights` every parameter registered by a module's constructor is
moved to the ``meta`` device the moment it is registered, so the module's own
``reset_parameters()`` runs on ``meta`` (free) and no weight memory is ever touched. Buffers
stay real by default, so non-persistent buffers (rotary ``inv_freq``, position ids, masks) are
computed by the model's own code. With ``include_buffers=True`` persistent buffers go to
``meta`` too (the loader fills them from the checkpoint); non-persistent buffers are never
moved, because no checkpoint contains them and their values would be lost.

Initialising a ``meta`` tensor is skipped altogether: while the context is active the
``torch.nn.init`` initialisers (``normal_``, ``kaiming_uniform_``, ...) return a ``meta``
tensor untouched and run as usual on any other tensor (so a buffer a constructor initialises
keeps its values). A meta tensor has no values to set, and the first ``normal_`` on one costs
seconds: torch imports its compiler stack (``torch._dynamo``) to find the meta kernel. So
the first empty build in a process is as fast as the next ones. transformers'
``no_init_weights`` does the same for every tensor; accelerate's ``init_empty_weights`` runs the
initialisers on ``meta``.

The patch is process-wide while the context is active (it replaces
``nn.Module.register_parameter`` / ``register_buffer`` and the ``torch.nn.init``
initialisers, and puts back exactly what it found on exit; contexts nest); a lock keeps two
threads from patching at once, but do not build unrelated modules in other threads meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["init_empty_weights", "init_on_device"]

_lock = threading.RLock()

#: The in-place initialisers of ``torch.nn.init`` that module constructors call.
_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def _skipping_meta(init: Callable[..., Any]) -> Callable[..., Any]:
    """``init``, except that a ``meta`` tensor is returned untouched."""

    @functools.wraps(init)
    def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return init(tensor, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """Skip the ``torch.nn.init`` initialisers on ``meta`` tensors; restore them on exit."""
    found = {name: getattr(nn.init, name) for name in _INITIALISERS if hasattr(nn.init, name)}
    for name, init in found.items():
        setattr(nn.init, name, _skipping_meta(init))
    try:
        yield
    finally:
        for name, init in found.items():
            setattr(nn.init, name, init)


@contextlib.contextmanager
def init_on_device(
    device: torch.device | str | int, include_buffers: bool = False
) -> Iterator[None]:
    """Register every new parameter (and persistent buffer if ``include_buffers``) on ``device``."""
    target = torch.device(device)
    with _lock:
        original_param = nn.Module.register_parameter
        original_buffer = nn.Module.register_buffer

        def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            original_param(module, name, param)
            if param is not None and param.device != target:
                current = module._parameters[name]
                assert current is not None
                kwargs: dict[str, Any] = dict(current.__dict__)
                moved = type(current)(current.to(target), requires_grad=current.requires_grad)
                moved.__dict__.update(kwargs)
                module._parameters[name] = moved

        def register_buffer(
            module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
        ) -> None:
            if tensor is not None and persistent and tensor.device != target:
                tensor = tensor.to(target)
            original_buffer(module, name, tensor, persistent=persistent)

        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign,assignment]
        if include_buffers:
            nn.Module.register_buffer = register_buffer  # type: ignore[method-assign,assignment]
        try:
            with _no_meta_init() if target.type == "meta" else contextlib.nullcontext():
                yield
        finally:
            nn.Module.register_parameter = original_param  # type: ignore[method-assign]
            nn.Module.register_buffer = original_buffer  # type: ignore[method-assign]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Construct modules with their parameters on ``meta``: no memory, no random init.

    >>> with init_empty_weights():
    ...     model = MyModel(config)      # instant, whatever the size
    >>> load_checkpoint(model, "ckpt/")  # weights go straight from the files into place
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield
