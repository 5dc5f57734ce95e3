"""accelerate's planning helpers: ``compute_module_sizes``, ``get_balanced_memory`` and
``infer_auto_device_map``, answered by bigmodel's one planner (:mod:`bigmodel.placement.planner`).

What is accelerate's here: names, parameters, defaults (``no_split_module_classes=None`` splits
anything), device values (integers for accelerators), ``"disk"`` planned last even when
``max_memory`` does not name it, and room for one streamed block kept on the device that runs
the blocks kept on ``cpu``/``disk`` (the planner's headroom with ``prefetch=False``:
:data:`PLANNED_PREFETCH`; the dispatch in :mod:`bigmodel.accelerate.dispatching` reads ahead
only where that costs no budget). What stays bigmodel's, on purpose (see the package
docstring): the room is the largest block actually streamed (accelerate: the largest block not
yet placed) and none is kept on ``cpu`` for ``disk`` blocks (they are read from the file
mapping, not the CPU budget's private memory); budgets are filled (a block that does not fit
does not close a device to later blocks that do), tied tensors are charged once and every
budget is kept or :class:`~bigmodel.PlanError` is raised.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.foundations.devices import (
    Device,
    accelerate_device,
    is_accelerator,
    planning_budgets,
)
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.log import logger
from bigmodel.placement.device_map import check_placement, warn_implicit_disk
from bigmodel.placement.planner import (
    Placement,
    PlanNode,
    PlanTensor,
    device_of,
    plan,
    tree_from_module,
)
from bigmodel.storage.dtypes import stored_nbytes

__all__ = [
    "PLANNED_PREFETCH",
    "compute_module_sizes",
    "get_balanced_memory",
    "infer_auto_device_map",
]

MaxMemory = Mapping[Any, int | str | None]
DtypeLike = str | torch.dtype | None

#: The read-ahead the plans here keep room for: none, as accelerate keeps room for one streamed
#: block only. Dispatching a map planned here reads ahead on an accelerator only within it.
PLANNED_PREFETCH = False


def _named_tensors(model: nn.Module, buffers_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if not buffers_only:
        yield from model.named_parameters()
    yield from model.named_buffers()


def compute_module_sizes(
    model: nn.Module,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    buffers_only: bool = False,
) -> defaultdict[str, int]:
    """Bytes under every module and tensor name (``""`` is the whole model), as accelerate's
    function returns them: a ``defaultdict(int)``; a tied tensor counts once, under its first
    name. ``dtype`` sizes floating-point tensors at that dtype, ``special_dtypes`` sizes the
    tensors it names at theirs; ``buffers_only`` counts buffers alone.

    Differs from accelerate: a floating-point tensor is sized at ``dtype`` even when that is
    wider than its own (accelerate takes the smaller of the two, but its loader then casts to
    ``dtype``, so its sizes undercount an upcast).
    """
    cast = parse_dtype(dtype)
    special = {k: parse_dtype(v) for k, v in (special_dtypes or {}).items()}
    sizes: defaultdict[str, int] = defaultdict(int)
    for name, tensor in _named_tensors(model, buffers_only):
        own = special.get(name)
        size = stored_nbytes(tensor, own if own is not None else cast)
        parts = name.split(".")
        for end in range(len(parts) + 1):
            sizes[".".join(parts[:end])] += size
    return sizes


# -- budgets ------------------------------------------------------------------------------


def _accelerate_budgets(budgets: Mapping[Device, int | None]) -> dict[int | str, int]:
    return {accelerate_device(d): b for d, b in budgets.items() if b is not None}


def _no_split_names(classes: Iterable[type[nn.Module] | str] | str | None) -> list[str]:
    if classes is None:
        return []
    if isinstance(classes, str):
        return [classes]
    return [c if isinstance(c, str) else c.__name__ for c in classes]


def _largest_block(model: nn.Module, sizes: Mapping[str, int], no_split: list[str]) -> int:
    """Size of the first instance of each no-split class (accelerate's rule), the largest."""
    seen: dict[str, int] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and kind in no_split and kind not in seen:
            seen[kind] = sizes.get(name, 0)
    return max(seen.values(), default=0)


def _mean_final_module(sizes: Mapping[str, int]) -> int:
    """Mean size of the modules that hold tensors but no sized submodule (accelerate's
    "final modules"): leaves of the size tree once the tensor names are taken off."""

    def leaves(names: Iterable[str]) -> set[str]:
        names = set(names)
        parents = {n.rpartition(".")[0] for n in names if "." in n}
        return {n for n in names if n and n not in parents}

    modules = set(sizes) - leaves(sizes)
    final = leaves(modules)
    return int(sum(sizes[n] for n in final) / max(len(final), 1))


def get_balanced_memory(
    model: nn.Module,
    max_memory: MaxMemory | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | str | None = None,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """A ``max_memory`` (integer keys for accelerators, sizes in bytes) that spreads the model
    evenly over the accelerators, for :func:`infer_auto_device_map`, as accelerate computes it:
    each accelerator but the last gets an even share of the model plus a margin (1.25x the
    larger of the largest no-split block and the mean final module); the last keeps its
    whole budget. ``low_zero`` keeps as little as possible on the first accelerator (for
    ``generate``). Without accelerators the budgets come back unchanged.

    Differs from accelerate: without ``max_memory`` the budgets are bigmodel's (free memory
    minus 10% on every device, see :func:`bigmodel.infer_device_map`) rather than all free
    memory with 10% off a single accelerator only; ``disk`` is returned only if named.
    """
    budgets = _accelerate_budgets(planning_budgets(max_memory)[0])
    gpus = sorted(k for k, v in budgets.items() if isinstance(k, int) and v > 0)
    if not gpus:
        return budgets
    low_zero = low_zero and len(gpus) > 1
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    share = sizes[""] // (len(gpus) - 1 if low_zero else len(gpus))
    no_split = _no_split_names(no_split_module_classes)
    margin = max(_largest_block(model, sizes, no_split), _mean_final_module(sizes))
    share += int(1.25 * margin)
    first = gpus[0]
    for index in gpus[:-1]:
        budgets[index] = min(
            budgets[first] if low_zero and index == first else share, budgets[index]
        )
    if low_zero:
        rest = sum(budgets[i] for i in gpus[1:])
        budgets[first] = min(max(0, sizes[""] - rest), budgets[first])
    return budgets


# -- planning ----------------------------------------------------------------------------


def _tree(
    model: nn.Module,
    dtype: DtypeLike,
    special_dtypes: Mapping[str, str | torch.dtype] | None,
    no_split: list[str],
) -> PlanNode:
    """The planner's tree of ``model``; tensors named in ``special_dtypes`` sized at theirs."""
    tree = tree_from_module(model, dtype=parse_dtype(dtype), no_split_module_classes=no_split)
    if special_dtypes:
        numel = {
            name: t.numel()
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        }
        special = {k: parse_dtype(v) for k, v in special_dtypes.items()}
        for node in tree.walk():
            node.tensors = [
                PlanTensor(t.name, t.identity, numel[t.name] * dtype_.itemsize)
                if (dtype_ := special.get(t.name)) is not None
                else t
                for t in node.tensors
            ]
    return tree


def _warn_buffers(model: nn.Module, placement: Placement) -> None:
    """accelerate's warning: buffers of modules kept on cpu/disk run on an accelerator, and
    no accelerator has room left for them beside its blocks and its reserve."""
    accelerators = [d for d in placement.budgets if is_accelerator(d)]
    if not accelerators:
        return
    offloaded = sum(
        stored_nbytes(b)
        for name, b in model.named_buffers()
        if device_of(name, placement.device_map) in ("cpu", "disk")
    )
    room = [
        (placement.budgets[d] or 0) - placement.used.get(d, 0) - placement.reserved.get(d, 0)
        for d in accelerators
    ]
    if offloaded and max(room) < offloaded:
        warnings.warn(
            f"The buffers of the modules kept on cpu/disk need {offloaded} bytes on the "
            "execution device, which no accelerator has left after this plan. If you run out "
            "of memory, pass offload_buffers=True.",
            stacklevel=3,
        )


def infer_auto_device_map(
    model: nn.Module,
    max_memory: MaxMemory | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | str | None = None,
    dtype: DtypeLike = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> OrderedDict[str, int | str]:
    """Plan ``{module name: device}`` for ``model`` (``meta`` is fine), accelerate's way round:
    accelerators (as integers), then ``cpu``, then ``disk`` (planned last even when
    ``max_memory`` does not name it: a warning gives the bytes sent there);
    ``no_split_module_classes=None`` lets any module be split; room for one streamed block is
    kept on the accelerator that runs the blocks kept on ``cpu``/``disk`` (the first one the
    plan uses, as :func:`dispatch_model` picks it); ``special_dtypes`` sizes the
    tensors it names at their own dtype; without ``offload_buffers``, accelerate's warning when
    the buffers of offloaded modules fit on no accelerator.

    Differs from accelerate: the plan is bigmodel's planner's. The room kept is the largest
    block actually streamed (accelerate: the largest block not yet placed), and none is kept
    on ``cpu`` for ``disk`` blocks (bigmodel reads them from the file mapping, outside the CPU
    budget), so a ``cpu`` budget holds one block more than accelerate's. Every device is filled (what
    ``fallback_allocation=True`` asks of accelerate is always done), tied tensors are charged
    once, the result is always cleaned (``clean_result`` is accepted), ``verbose`` logs the plan
    instead of printing, and a block that fits nowhere raises :class:`~bigmodel.PlanError`
    where accelerate returns a map that overruns a budget.
    """
    del clean_result, fallback_allocation  # always cleaned; always filled
    budgets, implicit_disk = planning_budgets(max_memory)
    tree = _tree(model, dtype, special_dtypes, _no_split_names(no_split_module_classes))
    # the execution device is the plan's first accelerator, as dispatch_model picks it
    placement = plan(tree, budgets, prefetch=PLANNED_PREFETCH)
    check_placement(placement)
    if implicit_disk:
        warn_implicit_disk(placement)
    if not offload_buffers:
        _warn_buffers(model, placement)
    result: OrderedDict[str, int | str] = OrderedDict(
        (name, accelerate_device(device)) for name, device in placement.device_map.items()
    )
    if verbose:
        logger.info("infer_auto_device_map: %s (bytes used: %s)", dict(result), placement.used)
    return result
