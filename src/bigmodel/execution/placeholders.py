"""Placeholders of offloaded tensors: ``meta`` tensors that refuse to compute.

An offloaded tensor is replaced by a placeholder on the ``meta`` device, and its data is put
in place only for the forward of its unit (:mod:`bigmodel.execution.offload`). In torch 2.13
mixing a ``meta`` tensor with a real one does not raise: ``F.linear(cpu_x, meta_w)`` and
``cpu_x @ meta_w`` return CPU tensors of uninitialised memory. A plain ``meta`` placeholder
used outside its unit (a submodule called directly, ``model.layers[3].attn(x)``; a module
reading the weight of another unit it does not call) would therefore give silently wrong
outputs.

:class:`OffloadedPlaceholder` is a ``meta`` tensor whose ``__torch_function__`` lets
everything that only reads metadata through — shape, dtype, device, ``numel``,
``requires_grad``, ``repr``, ``detach``/views/``.to("meta")`` (which stay placeholders),
``nn.Parameter`` wrapping, ``state_dict`` and ``named_parameters`` walks, the ``*_like`` and
``new_*`` factories — and raises :class:`~bigmodel.foundations.errors.MetaTensorError` for any
operation that would combine it with real data or produce real data from it, naming the
tensor, its unit and the fix. Operations among ``meta`` tensors only (shape inference) are
allowed: they compute nothing.

Cost: only operations that receive a placeholder run this Python check; while a unit is
materialised its modules hold ordinary tensors, so the forward pass pays nothing per op.
Not covered: code that bypasses ``__torch_function__`` (a C++/CUDA extension bound without
torch's dispatcher reading ``data_ptr()``) sees a plain ``meta`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bigmodel.foundations.errors import MetaTensorError

__all__ = ["OffloadedPlaceholder", "make_placeholder"]

#: The stable short code of the error (``MetaTensorError.code`` is about loads).
CODE = "offloaded-outside-unit"

_FACTORIES = frozenset(
    {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}
    | {"randint_like", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided"}
)


class OffloadedPlaceholder(torch.Tensor):
    """A ``meta`` tensor standing for an offloaded tensor outside its unit's forward.

    ``_bigmodel_name``: the tensor's name in the model; ``_bigmodel_scope``: the module whose
    forward materialises it (its unit). Built by :func:`make_placeholder`. Calling the class
    with real data (as accelerate's ``set_module_tensor_to_device`` calls ``type(param)``)
    gives an ordinary ``nn.Parameter``.
    """

    _bigmodel_name: str
    _bigmodel_scope: str

    def __new__(cls, data: torch.Tensor, requires_grad: bool = True, **_: Any) -> Any:
        if data.is_meta:
            return make_placeholder(data, "<unknown>", "", is_parameter=True, grad=requires_grad)
        return nn.Parameter(data, requires_grad=requires_grad)

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        """A new placeholder of the same tensor (torch's copy would lose the class)."""
        copied = make_placeholder(
            self,
            getattr(self, "_bigmodel_name", "<unknown>"),
            getattr(self, "_bigmodel_scope", ""),
            is_parameter=isinstance(self, nn.Parameter),
            grad=self.requires_grad,
        )
        memo[id(self)] = copied
        return copied

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            unary = not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
            inputs = [args[0]] if unary else list(_tensors((args, kwargs)))  # unary: fast
            source = next((t for t in inputs if _is_placeholder(t)), None)
            name = getattr(func, "__name__", "")
            # no placeholder (its data was replaced: ``.data = real``), or a factory that
            # reads only shape, dtype and device
            if source is None or name in _FACTORIES:
                return func(*args, **kwargs)
            if name != "__set__" and any(not t.is_meta for t in inputs):
                raise _error(source, func)
            try:
                out = func(*args, **kwargs)
            except (NotImplementedError, RuntimeError, TypeError) as error:
                if "meta" not in str(error):  # "Cannot copy out of meta tensor", item(), numpy()
                    raise
                raise _error(source, func) from error
            produced = list(_tensors(out)) if isinstance(out, (torch.Tensor, tuple, list)) else []
            if any(not t.is_meta for t in produced):
                raise _error(source, func)
            return _wrap(out, source) if produced else out


def make_placeholder(
    like: torch.Tensor, name: str, scope: str, *, is_parameter: bool, grad: bool = False
) -> torch.Tensor:
    """A placeholder with ``like``'s shape and dtype for the tensor ``name`` of unit ``scope``
    (an ``nn.Parameter`` when ``is_parameter``, as ``isinstance`` sees it)."""
    meta = torch.empty(like.shape, dtype=like.dtype, device="meta")
    placeholder: torch.Tensor = meta.as_subclass(OffloadedPlaceholder)
    if is_parameter:
        placeholder = nn.Parameter(placeholder, requires_grad=grad)
    _tag(placeholder, name, scope)
    return placeholder


def _tag(tensor: torch.Tensor, name: str, scope: str) -> None:
    tensor._bigmodel_name = name  # type: ignore[attr-defined]
    tensor._bigmodel_scope = scope  # type: ignore[attr-defined]


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, OffloadedPlaceholder) and tensor.is_meta


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _wrap(out: Any, source: torch.Tensor) -> Any:
    """Outputs (all on ``meta``) as placeholders of the same tensor, so a view or a ``detach``
    of a placeholder still refuses to compute and still names it."""
    name = getattr(source, "_bigmodel_name", "<unknown>")
    scope = getattr(source, "_bigmodel_scope", "")

    def wrap(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, OffloadedPlaceholder):
            value = value.as_subclass(OffloadedPlaceholder)
        if isinstance(value, OffloadedPlaceholder) and not hasattr(value, "_bigmodel_name"):
            _tag(value, name, scope)
        return value

    if isinstance(out, (tuple, list)):
        return type(out)(wrap(v) for v in out)
    return wrap(out)


def _error(source: torch.Tensor, func: Callable[..., Any]) -> MetaTensorError:
    name = getattr(source, "_bigmodel_name", "<unknown>")
    scope = getattr(source, "_bigmodel_scope", "")
    unit = f"'{scope}'" if scope else "'' (the root module)"
    what = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    error = MetaTensorError(
        f"The offloaded tensor {name!r} was used by {what} outside the forward of its unit, "
        f"the module {unit}: outside it the tensor is a placeholder on the meta device "
        f"holding no data, and computing with it would give garbage [{CODE}]. Fix: call the "
        f"unit's module {unit} (or one containing it) rather than a module inside it; if a "
        "module of another unit reads this tensor without calling its module, put both in one "
        "device-map entry, name a block class holding both in no_split_module_classes, or use a "
        "coarser device map."
    )
    error.code = CODE
    return error
