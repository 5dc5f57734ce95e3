"""Reading a load's planned tensors and putting each in place, one process or many.

A :class:`PlanReader` holds what every path shares (the module, the open checkpoint, the
module's tensors by name, the :class:`~bigmodel.placement.Placement`, the report and the
progress bar); :meth:`PlanReader.read` sends each planned tensor down one of three paths:

* local (one process, or a strategy where every rank maps the files): ``io="mmap"`` views of
  the mapping after a background readahead of every planned byte, or ``io="pread"`` parallel
  reads bounded by bytes in flight (see :mod:`bigmodel.storage.pread`);
* sharded (a DTensor target): only the slice this rank's placement owns is read;
* replicated under a process group: ``mmap``, ``shm``, ``scatter`` or ``rank0`` (see
  :mod:`bigmodel.execution.distributed`).

Tensors go from the file to their final dtype and device in one step; at most one converted
tensor is in flight beyond the final model (``io="pread"``: the in-flight bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    rank_of,
    run_step,
    world_of,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import IOOptions, LoadReport
from bigmodel.placement.load_plan import Plan
from bigmodel.placement.policy import Placement, like, place
from bigmodel.storage.pread import pick_io, pread_tensors

__all__ = ["PlanReader"]


@dataclass
class PlanReader:
    """One load's reading: see the module docstring for the paths a tensor can take."""

    model: nn.Module
    ckpt: Checkpoint
    targets: dict[str, torch.Tensor]
    placement: Placement
    report: LoadReport
    #: Replace tensors (load_checkpoint); False copies into materialised ones (HF semantics).
    assign: bool = True
    io: IOOptions = field(default_factory=IOOptions)
    strategy: str = "auto"
    progress: bool | None = None
    bar: Any = None

    def read(self, plan: Plan, group: Group | None = None) -> None:
        """Read each planned tensor in file order and put it in place.

        Offloaded tensors are skipped (their hooks read them); DTensor targets get only this
        rank's slice; under a process group, replicated tensors follow ``strategy``.
        """
        todo = [(k, g) for k, g in plan if not self.placement.offloaded(g[0])]
        sharded = [(k, g) for k, g in todo if is_dtensor(self.targets[g[0]])]
        replicated = [(k, g) for k, g in todo if not is_dtensor(self.targets[g[0]])]
        total = sum(self.ckpt.tensor_info(k).nbytes for k, _ in todo)
        with progress_bar(
            total=total, desc=f"Loading {self.ckpt.directory.name}", progress=self.progress
        ) as self.bar:
            if sharded:
                run_step(
                    group,
                    f"reading this rank's shards of {self.ckpt.path}",
                    lambda: self._read_shards(sharded),
                )
            if group is None:
                self._read_local(self._fetcher(replicated), replicated)
            elif replicated:
                self._read_replicated(replicated, group)

    def _fetcher(self, items: Plan) -> Callable[[str], torch.Tensor]:
        """How the single-process path gets each stored tensor, by ``io``.

        mmap: views of the mapping, after asking the kernel to read every planned tensor ahead
        in the background (views then do not fault page by page in the first forward pass,
        and conversions find their input cached). pread: parallel reads scheduled by bytes in
        flight (see ``bigmodel.storage.pread``).
        """
        ckpt = self.ckpt
        ranges = [ckpt.byte_range(key) for key, _ in items]
        io = pick_io(self.io.mode, ckpt.directory) if ranges and all(ranges) else "mmap"
        if io == "mmap":
            ckpt.readahead(key for key, _ in items)  # background readahead, cold caches only pay
            return ckpt.get_tensor
        stream = pread_tensors(
            [r for r in ranges if r is not None], max_inflight_bytes=self.io.inflight
        )

        def fetch(key: str) -> torch.Tensor:
            got, tensor = next(stream)
            assert got == key, (got, key)  # the stream follows the plan's order
            return tensor

        return fetch

    def _read_local(
        self,
        fetch: Callable[[str], torch.Tensor],
        items: Plan,
        *,
        counts: Callable[[str], bool] = lambda key: True,
    ) -> None:
        """``fetch(key)`` gives the stored tensor (usually a file view); ``counts(key)`` says
        whether this process read its bytes (for ``LoadReport.bytes_read``)."""
        placement = self.placement
        for key, group in items:
            old = self.targets[group[0]]
            data = fetch(key)
            if self.assign or old.is_meta:
                value = data.to(
                    device=placement.device_for(group[0], old),
                    dtype=placement.dtype_for(group[0], old),
                )
                place(self.model, group, old, value)
            else:
                with torch.no_grad():
                    old.copy_(data)
            del data
            nbytes = self.ckpt.tensor_info(key).nbytes
            if counts(key):
                self.report.bytes_read += nbytes
            self.report.loaded_keys.append(key)
            self.bar.update(nbytes)

    def _read_shards(self, items: Plan) -> None:
        """DTensor targets: read the slice each placement owns, never the whole tensor."""
        state: dict[str, torch.Tensor] = {}
        for key, group in items:
            old = self.targets[group[0]]
            mesh_type = old.device_mesh.device_type  # type: ignore[attr-defined]
            device = (
                torch.device(mesh_type, torch.cuda.current_device())
                if mesh_type == "cuda"
                else torch.device(mesh_type)
            )
            stored = self.ckpt.get_slice(key)
            value, nbytes = local_shard(
                lambda index, stored=stored: stored[index],  # type: ignore[misc]
                old,
                dtype=self.placement.dtype_for(group[0], old),
                device=device,
            )
            state.update(dict.fromkeys(group, like(old, value)))
            self.report.bytes_read += nbytes
            self.report.loaded_keys.append(key)
            self.bar.update(self.ckpt.tensor_info(key).nbytes)
        # load_state_dict(assign=True) lets fully_shard / parallelize_module re-register params
        self.model.load_state_dict(state, strict=False, assign=True)

    def _read_replicated(self, items: Plan, group: Group) -> None:
        """Plain tensors on every rank of ``group``, one copy per node where the target allows."""
        ckpt, targets, placement = self.ckpt, self.targets, self.placement
        devices = {placement.device_for(g[0], targets[g[0]]).type for _, g in items}
        stored = {k: ckpt.tensor_info(k).dtype for k, _ in items}
        wanted = {k: placement.dtype_for(g[0], targets[g[0]]) for k, g in items}
        converted = {
            k
            for k in stored
            if stored[k] != wanted[k]
            and stored[k].is_floating_point
            and wanted[k].is_floating_point
        }
        strategy = choose_strategy(
            self.strategy, on_cpu=devices == {"cpu"}, converting=bool(converted)
        )
        logger.info("distributed load of %s: strategy %s", ckpt.path, strategy)
        if strategy == "mmap":
            run_step(
                group, f"loading {ckpt.path}", lambda: self._read_local(ckpt.get_tensor, items)
            )
            return
        if strategy == "shm":
            self._read_node_copy(items, group, converted, wanted)
            return
        self._read_and_broadcast(items, group, wanted, scatter=strategy == "scatter")

    def _read_node_copy(
        self, items: Plan, group: Group, converted: set[str], wanted: dict[str, torch.dtype]
    ) -> None:
        """``shm``: the node's first rank converts into shared memory; every rank maps it."""
        ckpt = self.ckpt
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
            lambda: self._read_local(
                fetch, items, counts=lambda key: key not in converted or node.is_leader
            ),
        )

    def _read_and_broadcast(
        self, items: Plan, group: Group, wanted: dict[str, torch.dtype], *, scatter: bool
    ) -> None:
        """``scatter`` / ``rank0``: each tensor is read by its owner and broadcast."""
        ckpt, targets, placement = self.ckpt, self.targets, self.placement
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
                    self.report.bytes_read += sizes[i]

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
            place(self.model, names, old, value)
            self.report.loaded_keys.append(key)
            self.bar.update(sizes[i])
