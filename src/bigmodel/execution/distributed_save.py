"""``save_checkpoint`` under a process group: every rank writes its own shards, one commit.

Steps (each ends with an exchange of outcomes, see :func:`bigmodel.execution.distributed.run_step`):

1. Every rank computes the same shard plan from global shapes; shards are assigned to ranks,
   balanced by bytes. Rank 0 takes the folder's lock, cleans debris of earlier saves and shares
   its commit token, so every staged file of this save carries the same mark.
2. Shards are visited in plan order, the same on every rank; each DTensor is gathered to the
   one rank whose shard holds it (:class:`_Gatherer`: every rank sends its local piece once,
   to that rank only, so the group moves each byte once instead of ``world`` times as
   ``full_tensor()`` would, and no other rank materialises it).
3. A finished shard goes to its owner's background writer (:class:`_ShardWriter`), which
   stages it (temporary name, fsync'd when durable) while the next shards are gathered. The
   ranks write in parallel, and each holds about three shards' tensors at a time.
4. Rank 0 adopts every staged file, writes the index with every shard's digest, and
   publishes with the ordinary commit protocol (see :mod:`bigmodel.storage.commit`).

Any failure removes this save's staged files on every rank and raises
:class:`~bigmodel.DistributedError` everywhere; the previous checkpoint stays loadable.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigmodel.checkpoint.naming import (
    HF_LAYOUT,
)
from bigmodel.checkpoint.sharding import find_aliases
from bigmodel.execution.distributed import (
    Group,
    assign_owners,
    broadcast_object,
    global_rank,
    rank_of,
    run_step,
    world_of,
)
from bigmodel.execution.writing import ShardStager, WriteOptions, plan_files, prepare_directory
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import ProgressBar, progress_bar
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import SaveResult
from bigmodel.storage.commit import Commit

__all__ = ["save_distributed"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


_Piece = tuple[tuple[int, ...], tuple[int, ...]]  # (local shape, global offset)


class _Gatherer:
    """Gathers DTensors to one rank each with ``dist.gather``: each local piece travels once.

    Works for placements made of plain ``Shard`` and ``Replicate`` over a mesh whose ranks are
    exactly the save's group (FSDP2, tensor parallel, HSDP). Anything else (``Partial``
    reductions, strided shards, a mesh that is not the group) falls back to ``full_tensor()``,
    which is correct but sends every byte to every rank.
    """

    def __init__(self, state: dict[str, torch.Tensor], group: Group) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = rank_of(group)
        members = sorted(dist.get_process_group_ranks(group))
        mine = {k: self._safe_piece(k, t, members) for k, t in state.items() if is_dtensor(t)}
        everyone: list[Any] = [None] * world_of(group)
        dist.all_gather_object(everyone, mine, group=group)
        #: key -> every group rank's piece, for the DTensors this class can gather
        self.pieces: dict[str, list[_Piece]] = {
            k: [ranks[k] for ranks in everyone]
            for k in mine
            if all(ranks.get(k) is not None for ranks in everyone)
        }

    @classmethod
    def _safe_piece(cls, key: str, tensor: torch.Tensor, members: list[int]) -> _Piece | None:
        # A failure here must not leave this rank out of the all_gather the others wait in.
        try:
            return cls._piece(tensor, members)
        except Exception as exc:
            logger.debug("%s: gathered with full_tensor() (%s)", key, exc)
            return None

    @staticmethod
    def _piece(tensor: torch.Tensor, members: list[int]) -> _Piece | None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = tensor.device_mesh  # type: ignore[attr-defined]
        placements = tensor.placements  # type: ignore[attr-defined]
        if any(type(p) not in (Shard, Replicate) for p in placements):
            return None
        if sorted(mesh.mesh.flatten().tolist()) != members:
            return None
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
        return tuple(shape), tuple(offset)

    def gather(self, key: str, tensor: torch.Tensor, dst: int) -> torch.Tensor | None:
        """The whole tensor on group rank ``dst``; None on the other ranks."""
        import torch.distributed as dist

        pieces = self.pieces.get(key)
        if pieces is None:
            whole = tensor.full_tensor()  # type: ignore[attr-defined]
            return whole if self.rank == dst else None
        local = tensor.to_local()  # type: ignore[attr-defined]
        full_shape = tuple(tensor.shape)
        if all(shape == full_shape for shape, _ in pieces):  # replicated: dst has it already
            return local if self.rank == dst else None
        longest = max(math.prod(shape) for shape, _ in pieces)
        if local.is_contiguous() and local.numel() == longest:
            send = local.reshape(-1)  # an even piece goes as it is: no copy
        else:  # gather needs equal sizes: pad
            send = torch.empty(longest, dtype=local.dtype, device=local.device)
            send[: local.numel()] = local.reshape(-1)
        if self.rank != dst:
            dist.gather(send, None, dst=global_rank(self.group, dst), group=self.group)
            return None
        if _in_rank_order(pieces, full_shape, longest):
            # Row blocks in rank order (FSDP's dim-0 shards): receive straight into the result.
            landing = torch.empty(longest * len(pieces), dtype=local.dtype, device=local.device)
            dist.gather(
                send,
                [landing[r * longest : (r + 1) * longest] for r in range(len(pieces))],
                dst=global_rank(self.group, dst),
                group=self.group,
            )
            return landing[: math.prod(full_shape)].view(full_shape)
        inbox = [torch.empty_like(send) for _ in pieces]
        dist.gather(send, inbox, dst=global_rank(self.group, dst), group=self.group)
        whole = torch.empty(full_shape, dtype=local.dtype, device=local.device)
        for received, (shape, offset) in zip(inbox, pieces, strict=True):
            if math.prod(shape):
                region = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                whole[region] = received[: math.prod(shape)].view(shape)
            del received
        return whole


class _ShardWriter:
    """Writes this rank's shards in a background thread while the next ones are gathered.

    At most one finished shard waits for the writer (the queue holds one), so a rank holds
    about three shards' tensors at a time — the one being written, the one waiting, the one
    being gathered — instead of every shard it owns. A full queue blocks the gathering, which
    paces the whole group to the writers' speed. After a write fails, the thread keeps draining
    the queue (dropping shards) so the gathering, which other ranks take part in, never blocks.
    """

    def __init__(self, write: Callable[[int, dict[str, torch.Tensor]], None]) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[int, dict[str, torch.Tensor]] | None] = queue.Queue(1)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bigmodel-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as exc:
                    self.error = exc
            del item  # release the shard's tensors before waiting for the next one

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._queue.put((index, tensors))

    def close(self, *, reraise: bool = True) -> None:
        """Wait for the queued shards to be written; raise the first write error."""
        self._queue.put(None)
        self._thread.join()
        if reraise and self.error is not None:
            raise self.error


def _in_rank_order(pieces: list[_Piece], full_shape: tuple[int, ...], longest: int) -> bool:
    """True when piece ``r`` is the flat range starting at ``r * longest`` of the whole tensor
    (whole rows, in rank order), so equal-sized receive buffers laid end to end are the tensor."""
    row = math.prod(full_shape[1:])
    for r, (shape, offset) in enumerate(pieces):
        if not math.prod(shape):
            continue
        if tuple(shape[1:]) != full_shape[1:] or any(offset[1:]):
            return False
        if offset[0] * row != r * longest:
            return False
    return True


class _DistributedSave:
    """One collective save: the steps of the module docstring, one method each."""

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        directory: Path,
        opts: WriteOptions,
        group: Group,
        limit: int,
    ) -> None:
        self.group, self.directory = group, directory
        self.rank, self.world = rank_of(group), world_of(group)
        # Tied DTensors are one parameter object, so their local shards share storage too.
        # Rank 0's view decides, so every rank plans the same files.
        mine = find_aliases({k: _local(v) for k, v in state.items()}) if opts.safe else {}
        self.opts = dataclasses.replace(opts, aliases=broadcast_object(group, mine))
        self.stored = {k: v for k, v in state.items() if k not in self.opts.aliases}
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in self.stored.items()}
        self.plan = plan_files(specs, limit, self.opts)
        self.names, self.index_name = self.opts.file_names(self.plan)
        self.owners = assign_owners(self.plan.sizes, self.world)
        self.mine = [i for i, owner in enumerate(self.owners) if owner == self.rank]
        self.commit: Commit | None = None

    def _lock(self) -> str | None:
        """Rank 0 takes the folder's lock and cleans debris; its commit token marks every file."""
        prepare_directory(self.directory, create=self.rank == 0)
        if self.rank != 0:
            return None
        self.commit = Commit(self.directory, layout=HF_LAYOUT, durable=self.opts.durable)
        self.commit.lock()
        self.commit.clean_debris()
        return self.commit.token

    def _join(self) -> Commit:
        token = run_step(self.group, f"preparing to save into {self.directory}", self._lock)
        token = broadcast_object(self.group, token)
        if self.commit is None:
            self.commit = Commit(
                self.directory, layout=HF_LAYOUT, durable=self.opts.durable, token=token
            )
        return self.commit

    def _gather_and_write(self, stager: ShardStager) -> None:
        """Visit shards in plan order (the same on every rank, so collectives pair); each goes
        to its owner's background writer."""
        gatherer = _Gatherer(self.stored, self.group)
        writer = _ShardWriter(lambda i, tensors: stager.stage(self.names[i], tensors))
        try:
            for i, keys in enumerate(self.plan.shards):
                tensors: dict[str, torch.Tensor] = {}
                for key in keys:
                    tensor = self.stored[key]
                    if is_dtensor(tensor):
                        whole = gatherer.gather(key, tensor, self.owners[i])
                        if whole is not None:
                            tensors[key] = whole
                    elif self.owners[i] == self.rank:
                        tensors[key] = tensor
                if self.owners[i] == self.rank:
                    writer.put(i, tensors)
                del tensors
        except BaseException:
            writer.close(reraise=False)
            raise
        writer.close()

    def _publish(self, commit: Commit, stager: ShardStager) -> None:
        """Rank 0 adopts every rank's staged files, writes the index, publishes."""
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, (commit.staged(), stager.digests), group=self.group)

        def publish() -> None:
            if self.rank != 0:
                return
            for other, (staged, their_digests) in enumerate(everyone):
                if other != 0:
                    commit.adopt(staged)
                stager.digests.update(their_digests)
            stager.stage_index(self.names, self.plan)
            commit.publish(self.index_name)

        run_step(self.group, f"publishing the checkpoint in {self.directory}", publish)

    def run(self) -> SaveResult:
        bar: Any = ProgressBar()
        try:
            commit = self._join()
            bar = progress_bar(
                total=sum(self.plan.sizes[i] for i in self.mine),
                desc=f"Saving {self.directory.name} (rank {self.rank})",
                progress=self.opts.progress,
            )
            stager = ShardStager(commit, self.opts, self.index_name, bar)
            run_step(
                self.group,
                f"gathering and writing shards into {self.directory}",
                lambda: self._gather_and_write(stager),
            )
            self._publish(commit, stager)
        except BaseException:
            if self.commit is not None:
                self.commit.abort()
            raise
        finally:
            bar.close()
            if self.rank == 0 and self.commit is not None:
                self.commit.unlock()
        logger.info(
            "rank %d of %d wrote %d of %d file(s) into %s",
            self.rank,
            self.world,
            len(self.mine),
            len(self.names),
            self.directory,
        )
        return self.opts.result(self.directory, self.plan)


def save_distributed(
    state: dict[str, torch.Tensor], directory: Path, opts: WriteOptions, *, group: Group, limit: int
) -> SaveResult:
    """Save ``state`` from every rank of ``group`` into one checkpoint (see the module docstring)."""
    return _DistributedSave(state, directory, opts, group, limit).run()
