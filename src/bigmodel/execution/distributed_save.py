"""``save_checkpoint`` under a process group: every rank writes its own shards, one commit.

Steps (each ends with an exchange of outcomes, see :func:`bigmodel.execution.distributed.run_step`):

1. Every rank computes the same shard plan from global shapes; shards are assigned to ranks,
   balanced by bytes; the ranks compare the plans' digests (:func:`check_plans`), so a rank
   called with other options fails every rank instead of pairing the wrong gathers. Rank 0 takes the folder's lock, cleans debris of earlier saves and shares
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

In the background (:func:`submit_distributed`), the calling thread of every rank waits for
the previous background save, gets the side group (:func:`~bigmodel.execution.distributed.save_group`:
gloo, same members, made once), turns each gatherable DTensor into a :class:`LocalShard`
(DTensors only ``full_tensor()`` can gather are made whole here, on their own mesh), plans
alone, without any collective (:mod:`bigmodel.execution.save_plan`; pieces and plan are reused
while the state's signature is unchanged), and stages its local pieces plus the plain tensors
it writes (:mod:`bigmodel.execution.background`). A worker thread per rank then exchanges the
staging outcomes, compares the plans' digests (:func:`check_plans`: ranks that planned
differently all fail there, before anything is written) and runs steps 1-4 over the side group from the staged copies, so the training
loop's collectives on its own group never interleave with the save's. A rank whose staging
failed still runs its worker, which reports the failure in that first exchange. A rank that
dies outright (``kill -9``) breaks the side group: its peers' gloo operations fail (closed
connection, or at worst :data:`~bigmodel.execution.distributed.SAVE_GROUP_TIMEOUT`), which
:func:`~bigmodel.execution.distributed.collective` turns into a
:class:`~bigmodel.DistributedError` naming the side group and the lost rank; their handles
raise it, rank 0's abort removes every staged file of the save (all carry its token), nothing
is published, the previous checkpoint stays, and the workers end (the process can exit).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from bigmodel.checkpoint.naming import (
    HF_LAYOUT,
)
from bigmodel.checkpoint.sharding import find_aliases
from bigmodel.execution.background import SaveHandle, submit, wait_for_saves
from bigmodel.execution.distributed import (
    Group,
    broadcast_object,
    collective,
    global_rank,
    rank_of,
    run_step,
    save_group,
    world_of,
)
from bigmodel.execution.save_plan import PlanCache, SavePlan, plan_key, signature
from bigmodel.execution.writing import ShardStager, WriteOptions, prepare_directory
from bigmodel.foundations.errors import DistributedError
from bigmodel.foundations.log import logger
from bigmodel.foundations.progress import ProgressBar, progress_bar
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import SaveResult
from bigmodel.storage.commit import Commit

__all__ = [
    "DistributedSave",
    "Entry",
    "LocalShard",
    "check_plans",
    "gather_all",
    "gather_inputs",
    "restage_entries",
    "cached_local_state",
    "local_state",
    "pieces_of",
    "planned_locally",
    "save_distributed",
    "staging_failed",
    "staging_outcome",
    "submit_distributed",
]


_Piece = tuple[tuple[int, ...], tuple[int, ...]]  # (local shape, global offset)


@dataclass(frozen=True)
class LocalShard:
    """This rank's piece of a sharded tensor, with what gathering it needs (no DTensor).

    ``local`` is the piece (the DTensor's ``to_local()``, or its staged copy), ``shape`` the
    whole tensor's shape and ``piece`` its (local shape, global offset). A background save
    stages ``local`` and gathers from the copy, so the live DTensor may change meanwhile.
    """

    local: torch.Tensor
    shape: tuple[int, ...]
    piece: _Piece


#: What a collective save holds per name: a plain tensor (written by its owner), a
#: :class:`LocalShard`, or a DTensor that only ``full_tensor()`` can gather.
Entry = torch.Tensor | LocalShard


def _local(entry: Entry) -> torch.Tensor:
    if isinstance(entry, LocalShard):
        return entry.local
    return entry.to_local() if is_dtensor(entry) else entry  # type: ignore[attr-defined]


def _spec(entry: Entry) -> tuple[torch.dtype, tuple[int, ...]]:
    if isinstance(entry, LocalShard):
        return entry.local.dtype, entry.shape
    return entry.dtype, tuple(entry.shape)


def _piece(tensor: torch.Tensor, members: list[int]) -> _Piece | None:
    """(local shape, global offset) when ``dist.gather`` can collect ``tensor``: placements of
    plain ``Shard``/``Replicate`` over a mesh whose ranks are the group's. Global metadata, so
    every rank decides alike."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        mesh = tensor.device_mesh  # type: ignore[attr-defined]
        placements = tensor.placements  # type: ignore[attr-defined]
        if any(type(p) not in (Shard, Replicate) for p in placements):
            return None
        if sorted(mesh.mesh.flatten().tolist()) != members:
            return None
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    except Exception as exc:
        logger.debug("gathered with full_tensor() (%s)", exc)
        return None
    return tuple(shape), tuple(offset)


def pieces_of(state: Mapping[str, torch.Tensor], group: Group) -> dict[str, _Piece | None]:
    """Every DTensor's piece (:func:`_piece`); None for those only ``full_tensor()`` gathers."""
    import torch.distributed as dist

    members = sorted(dist.get_process_group_ranks(group))
    return {k: _piece(t, members) for k, t in state.items() if is_dtensor(t)}


def local_state(
    state: Mapping[str, torch.Tensor],
    group: Group,
    *,
    whole: bool,
    pieces: Mapping[str, _Piece | None] | None = None,
) -> dict[str, Entry]:
    """``state`` with every gatherable DTensor as a :class:`LocalShard` (a view, no copy).

    Other DTensors (``Partial`` sums, strided shards, another mesh) stay DTensors, gathered
    with ``full_tensor()`` in plan order (``whole=False``), or are made whole now, in the
    calling thread, where the collective on their mesh may run (``whole=True``: a
    background save, whose worker must not touch the training loop's groups). ``pieces``:
    those of :func:`pieces_of` for this state, computed earlier.
    """
    if pieces is None:
        pieces = pieces_of(state, group)
    out: dict[str, Entry] = {}
    for key, tensor in state.items():
        if not is_dtensor(tensor):
            out[key] = tensor
        elif (piece := pieces[key]) is not None:
            out[key] = LocalShard(tensor.to_local(), tuple(tensor.shape), piece)  # type: ignore[attr-defined]
        else:
            out[key] = tensor.full_tensor() if whole else tensor  # type: ignore[attr-defined]
    return out


_PLANS = PlanCache()


def cached_local_state(
    state: Mapping[str, torch.Tensor], group: Group, *, side: Group, kind: str
) -> tuple[dict[str, Entry], tuple[Any, ...]]:
    """:func:`local_state` for a background save (``whole=True``), with the pieces of the last
    save of this ``kind`` over ``side`` when ``state``'s :func:`signature` is unchanged.
    Returns the entries and the signature."""
    sig = signature(state)
    pieces = _PLANS.pieces(side, kind, sig)
    if pieces is None:
        pieces = pieces_of(state, group)
        _PLANS.keep_pieces(side, kind, sig, pieces)
    return local_state(state, group, whole=True, pieces=pieces), sig


def planned_locally(
    state: Mapping[str, torch.Tensor],
    directory: Path,
    opts: WriteOptions,
    *,
    group: Group,
    side: Group,
    limit: int,
    kind: str = "model",
) -> DistributedSave:
    """The background save of ``state`` over ``side``, planned without any collective.

    Pieces and plan come from :data:`_PLANS` when ``state``'s signature is unchanged since the
    last save of this ``kind`` over ``side``; the workers check that every rank planned alike
    (:func:`staging_outcome` with the plan's digest). Only DTensors that ``full_tensor()``
    alone can gather run a collective here, on their own mesh.
    """
    entries, sig = cached_local_state(state, group, side=side, kind=kind)
    aliases = find_aliases({k: _local(v) for k, v in entries.items()}) if opts.safe else {}
    key = plan_key(sig, aliases, opts, limit)
    plan = _PLANS.plan(side, kind, key)
    if plan is None:
        specs = {k: _spec(v) for k, v in entries.items()}
        plan = SavePlan.make(specs, opts, limit, world_of(side), aliases)
        _PLANS.keep_plan(side, kind, key, plan)
    return DistributedSave(entries, directory, opts, side, limit, plan=plan)


class _Gatherer:
    """Gathers :class:`LocalShard` entries to one rank each with ``dist.gather``: each local
    piece travels once. Other DTensors fall back to ``full_tensor()``, which is correct but
    sends every byte to every rank.
    """

    def __init__(self, state: Mapping[str, Entry], group: Group) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = rank_of(group)
        mine = {k: e.piece for k, e in state.items() if isinstance(e, LocalShard)}
        everyone: list[Any] = [None] * world_of(group)
        dist.all_gather_object(everyone, mine, group=group)
        #: key -> every group rank's piece
        self.pieces: dict[str, list[_Piece]] = {
            k: [ranks.get(k) for ranks in everyone] for k in mine
        }
        odd = sorted(k for k, pieces in self.pieces.items() if None in pieces)
        if odd:
            raise RuntimeError(
                f"DTensor(s) {odd[:3]} are sharded on this rank but not on every rank of the group. "
                "Fix: give every rank the same model, sharded the same way."
            )

    def gather(self, key: str, entry: Entry, dst: int) -> torch.Tensor | None:
        """The whole tensor on group rank ``dst``; None on the other ranks."""
        if not isinstance(entry, LocalShard):
            whole = entry.full_tensor()  # type: ignore[attr-defined]
            return whole if self.rank == dst else None
        return self._gather(self.pieces[key], entry.local, entry.shape, dst)

    def _gather(
        self, pieces: list[_Piece], local: torch.Tensor, full_shape: tuple[int, ...], dst: int
    ) -> torch.Tensor | None:
        import torch.distributed as dist

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


def gather_inputs(state: Mapping[str, Entry], rank: int, dst: int = 0) -> dict[str, torch.Tensor]:
    """What :func:`gather_all` to ``dst`` reads on ``rank``: every local piece; plain tensors
    on ``dst`` only (a background save stages exactly these)."""
    return {
        k: e.local if isinstance(e, LocalShard) else e
        for k, e in state.items()
        if isinstance(e, LocalShard) or rank == dst
    }


def restage_entries(
    state: Mapping[str, Entry], staged: Mapping[str, torch.Tensor]
) -> dict[str, Entry]:
    """``state`` reading from ``staged`` (copies of what :func:`gather_inputs` returned)."""
    return {
        k: dataclasses.replace(e, local=staged[k]) if isinstance(e, LocalShard) else staged[k]
        for k, e in state.items()
        if k in staged
    }


def gather_all(state: Mapping[str, Entry], group: Group, dst: int = 0) -> dict[str, torch.Tensor]:
    """Every entry whole on group rank ``dst`` (plain tensors: ``dst``'s own); {} elsewhere."""
    gatherer = _Gatherer(state, group)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):  # the same order on every rank: the gathers pair
        entry = state[key]
        if isinstance(entry, LocalShard) or is_dtensor(entry):
            whole = gatherer.gather(key, entry, dst)
        else:
            whole = entry if gatherer.rank == dst else None
        if whole is not None:
            out[key] = whole
    return out


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


class DistributedSave:
    """One collective save: the steps of the module docstring, one method each."""

    def __init__(
        self,
        state: Mapping[str, Entry],
        directory: Path,
        opts: WriteOptions,
        group: Group,
        limit: int,
        *,
        plan: SavePlan | None = None,
    ) -> None:
        self.group, self.directory = group, directory
        self.rank, self.world = rank_of(group), world_of(group)
        if plan is None:
            # Tied DTensors are one parameter object, so their local shards share storage too.
            # Rank 0's view decides, so every rank plans the same files.
            mine = find_aliases({k: _local(v) for k, v in state.items()}) if opts.safe else {}
            aliases = broadcast_object(group, mine, what=f"planning the save into {directory}")
            specs = {k: _spec(v) for k, v in state.items()}
            plan = SavePlan.make(specs, opts, limit, self.world, aliases)
        #: compared across ranks before anything is written (:func:`check_plans`)
        self.digest = plan.digest
        self.opts = dataclasses.replace(opts, aliases=plan.aliases)
        self.stored = {k: v for k, v in state.items() if k not in plan.aliases}
        self.plan, self.names, self.index_name = plan.files, plan.names, plan.index_name
        self.owners = plan.owners
        self.mine = [i for i, owner in enumerate(self.owners) if owner == self.rank]
        self.commit: Commit | None = None

    def to_stage(self) -> dict[str, torch.Tensor]:
        """What this rank's background save reads: every local piece, and the plain tensors of
        the shards it writes (a replicated tensor is written, so staged, by its owner alone)."""
        owned = {key for i in self.mine for key in self.plan.shards[i]}
        out: dict[str, torch.Tensor] = {}
        for key, entry in self.stored.items():
            if isinstance(entry, LocalShard):
                out[key] = entry.local
            elif key in owned:
                out[key] = entry
        return out

    def restage(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Read from ``staged`` (the copies of :meth:`to_stage`) from now on."""
        self.stored = restage_entries(self.stored, staged)

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
        token = broadcast_object(self.group, token, what=f"sharing the commit of {self.directory}")
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
                    entry = self.stored.get(key)
                    if isinstance(entry, LocalShard) or (entry is not None and is_dtensor(entry)):
                        whole = gatherer.gather(key, entry, self.owners[i])
                        if whole is not None:
                            tensors[key] = whole
                    elif self.owners[i] == self.rank:
                        assert entry is not None, key
                        tensors[key] = entry
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
        mine = (commit.staged(), stager.digests)
        collective(
            self.group,
            f"handing the staged files of {self.directory} to rank 0",
            lambda: dist.all_gather_object(everyone, mine, group=self.group),
        )

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
        check_plans(self.group, self.directory, self.digest)
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
    entries = local_state(state, group, whole=False)
    return DistributedSave(entries, directory, opts, group, limit).run()


def staging_outcome(group: Group, directory: Path, error: BaseException | None = None) -> None:
    """The first exchange of a background save's workers: did every rank stage its tensors?

    A rank whose staging failed still runs its worker, which raises its error here, so its
    peers learn it (a :class:`~bigmodel.DistributedError` naming it) instead of waiting for
    it in a gather."""

    def check() -> None:
        if error is not None:
            raise error

    run_step(group, f"staging the tensors of the save into {directory}", check)


def check_plans(group: Group, directory: Path, digest: str) -> None:
    """Every rank planned the same files (``digest``: :attr:`SavePlan.digest`), or every rank
    raises :class:`~bigmodel.DistributedError` naming those whose plan differs from rank 0's.

    A background save plans on each rank alone; a rank called with other options or another
    model would otherwise pair the wrong gathers and write a wrong checkpoint."""
    import torch.distributed as dist

    what = f"planning the save into {directory}"
    digests: list[Any] = [None] * world_of(group)
    collective(group, what, lambda: dist.all_gather_object(digests, digest, group=group))
    differ = {r: d for r, d in enumerate(digests) if d != digests[0]}
    if differ:
        raise DistributedError(
            what,
            {
                r: f"planned other files than rank 0 (plan {d[:12]}, rank 0's {digests[0][:12]}): "
                "the ranks' states differ in names, dtypes, shapes, placements or tied weights, "
                "or their save options differ. Fix: call the save on every rank with the same "
                "model, sharded the same way, and the same options."
                for r, d in differ.items()
            },
        )


def submit_distributed(
    state: Mapping[str, torch.Tensor],
    directory: Path,
    opts: WriteOptions,
    *,
    group: Group,
    limit: int,
    staging_memory: int | None,
) -> SaveHandle[SaveResult]:
    """A collective save in the background: every rank stages its own pieces, then a worker
    thread per rank gathers, writes and commits them over the side group (:func:`save_group`).

    Runs in the calling thread, on every rank in the same order: waits for the previous
    background save, makes the side group on first use, gathers the DTensors only
    ``full_tensor()`` can gather (on their own mesh), plans over the side group, stages.
    """
    started = time.perf_counter()
    wait_for_saves()  # the side group is the previous worker's until it is done
    waited = time.perf_counter()
    side = save_group(group)
    save = planned_locally(state, directory, opts, group=group, side=side, limit=limit)
    planned = time.perf_counter()

    def job(staged: Mapping[str, torch.Tensor]) -> SaveResult:
        staging_outcome(side, directory)
        save.restage(staged)
        return save.run()

    handle = submit(
        directory,
        save.to_stage(),
        job,
        cast=opts.dtype,
        staging_memory=staging_memory,
        failed=lambda error: staging_failed(side, directory, error),
    )
    logger.debug(
        "background save into %s: waited %.4f s, planned %.4f s, staged %.4f s",
        directory,
        waited - started,
        planned - waited,
        time.perf_counter() - planned,
    )
    return handle


def staging_failed(group: Group, directory: Path, error: BaseException) -> NoReturn:
    """The worker of a rank whose staging failed: tell the peers, raise."""
    staging_outcome(group, directory, error)
    raise error  # not reached: the exchange raises DistributedError
