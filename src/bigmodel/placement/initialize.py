"""Initialising only the weights a checkpoint did not provide, with the module's own initialiser.

For each module that owns a missing tensor, the initialiser (``init_fn(module)`` if given,
else the nearest ``reset_parameters()``/``_reset_parameters()`` on the module or an
ancestor) runs while every *loaded* tensor in that module's subtree is temporarily swapped
for a ``meta`` stand-in. Initialisers therefore write only the missing tensors: a loaded
weight is never initialised, not even transiently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from bigmodel.foundations.errors import MetaTensorError, MissingInitializerError
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.placement.policy import Placement, place

__all__ = ["InitFn", "check_nothing_on_meta", "initialize_missing", "materialize_missing"]

InitFn = Callable[[nn.Module], object]


def _initializer(module: nn.Module) -> Callable[[], object] | None:
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


@contextlib.contextmanager
def _loaded_on_meta(module: nn.Module, missing: set[int]) -> Iterator[None]:
    """Swap every tensor of ``module``'s subtree not in ``missing`` (by id) for a meta twin."""
    swapped: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []
    twins: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is None or id(tensor) in missing or tensor.is_meta:
                    continue
                twin = twins.get(id(tensor))
                if twin is None:
                    twin = torch.empty_like(tensor, device="meta")
                    if isinstance(tensor, nn.Parameter):
                        twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
                    twins[id(tensor)] = twin
                swapped.append((store, name, tensor))  # type: ignore[arg-type]
                store[name] = twin  # type: ignore[assignment]
    try:
        yield
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor


def initialize_missing(
    model: nn.Module, names: list[str], *, init_fn: InitFn | None = None
) -> list[str]:
    """Run initialisers for the module tensors ``names`` (already materialised, uninitialised).

    Returns the names initialised. Raises :class:`MissingInitializerError` naming the tensors
    that no initialiser covers.
    """
    state = model.state_dict(keep_vars=True)
    missing_ids = {id(state[n]) for n in names}
    by_module: dict[str, list[str]] = {}
    uncovered: list[str] = []
    for name in names:
        owner = name.rpartition(".")[0]
        if init_fn is not None:
            by_module.setdefault(owner, []).append(name)
            continue
        # The nearest module, from the owner up to the root, that knows how to initialise itself.
        path = owner
        while _initializer(model.get_submodule(path)) is None and path:
            path = path.rpartition(".")[0]
        if _initializer(model.get_submodule(path)) is None:
            uncovered.append(name)
        else:
            by_module.setdefault(path, []).append(name)
    if uncovered:
        raise MissingInitializerError(
            f"{len(uncovered)} tensor(s) are missing from the checkpoint and no module on their path has "
            f"reset_parameters(): {', '.join(uncovered[:20])} [{MissingInitializerError.code}]. "
            "Fix: pass init_fn=lambda module: ... to initialise them, or provide them in the checkpoint."
        )
    done: list[str] = []
    for path, owned in by_module.items():
        module = model.get_submodule(path)
        with torch.no_grad(), _loaded_on_meta(module, missing_ids):
            if init_fn is not None:
                init_fn(module)
            else:
                fn = _initializer(module)
                assert fn is not None
                fn()
        done.extend(owned)
    return done


def check_nothing_on_meta(model: nn.Module, skip: frozenset[str] = frozenset()) -> None:
    """Raise naming every tensor left on ``meta``, except the offloaded ones in ``skip``."""
    left = [
        f"parameter {n!r}"
        for n, p in model.named_parameters(remove_duplicate=False)
        if p.is_meta and n not in skip
    ]
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            full = f"{module_name}.{name}" if module_name else name
            if buf is not None and buf.is_meta and full not in skip:
                kind = (
                    "non-persistent buffer"
                    if name in module._non_persistent_buffers_set
                    else "buffer"
                )
                left.append(f"{kind} {full!r}")
    if left:
        raise MetaTensorError(
            f"After loading, {len(left)} tensor(s) are still on the meta device and hold no data: "
            f"{', '.join(left[:20])}{' ...' if len(left) > 20 else ''} [{MetaTensorError.code}]. "
            "Fix: build the model with bigmodel.init_empty_weights() (it keeps non-persistent buffers "
            "real) instead of torch.device('meta'), and let missing weights be initialised (init_missing=True)."
        )


def materialize_missing(
    model: nn.Module,
    targets: Mapping[str, torch.Tensor],
    to_init: list[list[str]],
    placement: Placement,
    init_fn: InitFn | None = None,
) -> list[str]:
    """Materialise the tensors still on meta that the checkpoint lacked, then initialise them.

    A materialised module keeps the values it was built with.
    """
    fresh: list[str] = []
    sharded = [g[0] for g in to_init if is_dtensor(targets[g[0]]) and targets[g[0]].is_meta]
    if sharded:
        raise MetaTensorError(
            f"{len(sharded)} sharded (DTensor) tensor(s) are not in the checkpoint: "
            f"{', '.join(sharded[:10])} [{MetaTensorError.code}]. bigmodel initialises missing "
            "tensors only for unsharded modules. Fix: load a checkpoint that has them, or "
            "initialise the model before fully_shard / parallelize_module."
        )
    for group in to_init:
        old = targets[group[0]]
        if old.is_meta:
            empty = torch.empty(
                old.shape,
                dtype=placement.dtype_for(group[0], old),
                device=placement.device_for(group[0], old),
            )
            place(model, group, old, empty)
            fresh.extend(group)
    return initialize_missing(model, fresh, init_fn=init_fn) if fresh else []
