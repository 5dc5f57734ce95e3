"""Reading under a process group: DTensor slices, and replicated tensors by strategy.

Functions of a load's reader (:class:`~bigmodel.execution.reading.PlanReader`, which holds
the module, the checkpoint, the placement, the report and the bar; :class:`Reader` names what
these paths use of it):

* :func:`read_sharded`: a DTensor target gets only the slice its placement owns, never the
  whole tensor;
* :func:`read_replicated`: plain tensors on every rank, one copy per node where the target
  allows: ``mmap`` (every rank maps the files), ``shm`` (the node's first rank converts into
  shared memory, every rank maps it), ``scatter``/``rank0`` (each tensor is read by its owner
  and broadcast). See :class:`~bigmodel.DistributedOptions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.execution.distributed import (
    Group,
    NodeCopy,
    assign_owners,
    broadcast_tensor,
    choose_strategy,
    local_shard,
    mesh_device,
    rank_of,
    run_step,
    world_of,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import LoadReport
from bigmodel.placement.load_plan import Plan
from bigmodel.placement.policy import Placement, like, place


class Reader(Protocol):
    """What the distributed paths use of a :class:`~bigmodel.execution.reading.PlanReader`."""

    model: nn.Module
    ckpt: Checkpoint
    targets: dict[str, torch.Tensor]
    placement: Placement
    report: LoadReport
    strategy: str
    bar: Any

    def read_local(
        self,
        fetch: Callable[[str], torch.Tensor],
        items: Plan,
        *,
        counts: Callable[[str], bool] = ...,
    ) -> None: ...


def read_sharded(reader: Reader, items: Plan) -> None:
    """DTensor targets: read the slice each placement owns, never the whole tensor."""
    state: dict[str, torch.Tensor] = {}
    for key, group in items:
        old = reader.targets[group[0]]
        device = mesh_device(old)
        stored = reader.ckpt.get_slice(key)
        value, nbytes = local_shard(
            lambda index, stored=stored: stored[index],  # type: ignore[misc]
            old,
            dtype=reader.placement.dtype_for(group[0], old),
            device=device,
        )
        state.update(dict.fromkeys(group, like(old, value)))
        reader.report.bytes_read += nbytes
        reader.report.loaded_keys.append(key)
        reader.bar.update(reader.ckpt.tensor_info(key).nbytes)
    # load_state_dict(assign=True) lets fully_shard / parallelize_module re-register params
    reader.model.load_state_dict(state, strict=False, assign=True)


def read_replicated(reader: Reader, items: Plan, group: Group) -> None:
    """Plain tensors on every rank of ``group``, one copy per node where the target allows."""
    ckpt, targets, placement = reader.ckpt, reader.targets, reader.placement
    devices = {placement.device_for(g[0], targets[g[0]]).type for _, g in items}
    stored = {k: ckpt.tensor_info(k).dtype for k, _ in items}
    wanted = {k: placement.dtype_for(g[0], targets[g[0]]) for k, g in items}
    converted = {
        k
        for k in stored
        if stored[k] != wanted[k] and stored[k].is_floating_point and wanted[k].is_floating_point
    }
    strategy = choose_strategy(
        reader.strategy, on_cpu=devices == {"cpu"}, converting=bool(converted)
    )
    logger.info("distributed load of %s: strategy %s", ckpt.path, strategy)
    if strategy == "mmap":
        run_step(group, f"loading {ckpt.path}", lambda: reader.read_local(ckpt.get_tensor, items))
        return
    if strategy == "shm":
        _read_node_copy(reader, items, group, converted, wanted)
        return
    _read_and_broadcast(reader, items, group, wanted, scatter=strategy == "scatter")


def _read_node_copy(
    reader: Reader, items: Plan, group: Group, converted: set[str], wanted: dict[str, torch.dtype]
) -> None:
    """``shm``: the node's first rank converts into shared memory; every rank maps it."""
    ckpt = reader.ckpt
    node = NodeCopy(group)
    try:
        run_step(
            group,
            "writing the node's converted copy",
            lambda: (
                node.write((k, ckpt.get_tensor(k), wanted[k]) for k in sorted(converted))
                if node.is_leader
                else None
            ),
        )
        run_step(group, "mapping the node's converted copy", node.open)
    finally:
        node.remove()  # every rank has mapped the files (or failed): the mappings keep them

    def fetch(key: str) -> torch.Tensor:
        return node.get(key) if key in converted else ckpt.get_tensor(key)

    run_step(
        group,
        f"loading {ckpt.path}",
        lambda: reader.read_local(
            fetch, items, counts=lambda key: key not in converted or node.is_leader
        ),
    )


def _read_and_broadcast(
    reader: Reader, items: Plan, group: Group, wanted: dict[str, torch.dtype], *, scatter: bool
) -> None:
    """``scatter`` / ``rank0``: each tensor is read by its owner and broadcast."""
    ckpt, targets, placement = reader.ckpt, reader.targets, reader.placement
    world, rank = world_of(group), rank_of(group)
    sizes = [ckpt.tensor_info(k).nbytes for k, _ in items]
    owners = assign_owners(sizes, world) if scatter else [0] * len(items)
    mine: dict[int, torch.Tensor] = {}

    def read_own() -> None:
        for i, (key, names) in enumerate(items):
            if owners[i] == rank:
                old = targets[names[0]]
                mine[i] = (
                    ckpt.get_tensor(key)
                    .to(device=placement.device_for(names[0], old), dtype=wanted[key])
                    .contiguous()
                )
                reader.report.bytes_read += sizes[i]

    run_step(group, f"reading this rank's part of {ckpt.path}", read_own)
    for i, (key, names) in enumerate(items):
        old = targets[names[0]]
        value = broadcast_tensor(
            group,
            mine.pop(i, None),
            src=owners[i],
            shape=old.shape,
            dtype=wanted[key],
            device=placement.device_for(names[0], old),
        )
        place(reader.model, names, old, value)
        reader.report.loaded_keys.append(key)
        reader.bar.update(sizes[i])
