"""Loading under ``torch.distributed``: one copy of the weights per node, each rank reads its part.

Everything goes through ``torch.distributed`` collectives on the caller's process group and
DTensor; there is no transport of our own. A single process (no group, or a group of one) is
the degenerate case and takes the ordinary path.

Strategies for *replicated* tensors (a plain tensor on every rank):

``mmap``
    Every rank maps the same files. Same dtype on CPU: the page cache is shared, so the node
    holds one copy whatever the number of ranks. The default for CPU loads without conversion.
``shm``
    A dtype change on CPU: the first rank of each node converts into files in shared memory
    (``/dev/shm``; a temporary folder if it lacks room) and every rank of the node maps them.
    One converted copy per node instead of one per rank. The default for CPU conversions.
``scatter``
    Tensors are spread over the ranks by size; each rank reads and converts only its own, then
    each is broadcast from its owner. Every byte is read once per group. The default for
    accelerator targets.
``rank0``
    Rank 0 reads everything and broadcasts (for filesystems where many readers are slow).

*Sharded* tensors (a DTensor parameter, after ``fully_shard`` or ``parallelize_module`` on a
``meta`` model) are never materialised whole: each rank reads the slice its placement owns.

Failures: each phase ends with an exchange of outcomes, so an exception on one rank becomes a
:class:`DistributedError` naming every failing rank on every rank, instead of a hang in the
next collective.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from bigmodel.foundations.errors import DistributedError
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import STRATEGIES
from bigmodel.storage.atomic import new_token
from bigmodel.storage.safetensors import SafetensorsFile
from bigmodel.storage.scratch import write_converted

__all__ = [
    "mesh_device",
    "broadcast_object",
    "collective",
    "Group",
    "assign_owners",
    "choose_strategy",
    "local_shard",
    "peer_lost",
    "resolve_group",
    "save_group",
]

T = TypeVar("T")
Group = Any  # torch.distributed.ProcessGroup; Any keeps torch.distributed optional at import


def resolve_group(process_group: Group | None) -> Group | None:
    """The group to coordinate over, or ``None`` for a single process.

    ``process_group`` wins (``False``: this process alone, whatever is initialised);
    otherwise the default group if ``torch.distributed`` is initialised.
    """
    if process_group is False:
        return None
    if process_group is None and "torch.distributed" not in sys.modules:
        return None  # nobody initialised a group; don't pay for importing torch.distributed
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if process_group is None:
        if not dist.is_initialized():
            return None
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) <= 1:
        return None
    return process_group


#: How long a collective of a background save's side group waits for a peer before it fails:
#: long enough for the slowest rank to write its shards, finite so that no rank hangs forever.
SAVE_GROUP_TIMEOUT = datetime.timedelta(minutes=30)

_SAVE_GROUPS: dict[Any, tuple[Any, Group]] = {}


def save_group(parent: Group) -> Group:
    """A gloo group with ``parent``'s members, for background saves; made once per parent.

    A background save's worker thread runs its collectives (gathers, outcome exchanges) here,
    so they never interleave with the training loop's collectives on ``parent``. Collective
    on first use: every member of ``parent`` must call it, in the same order as its other
    calls (``save_checkpoint`` is called by every rank in the same order, so that holds).
    The cache is keyed by ``parent`` and forgotten when the default group changes (a new
    ``init_process_group``).
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_group

    default = _get_default_group()
    cached = _SAVE_GROUPS.get(parent)
    if cached is not None and cached[0] is default:
        return cached[1]
    if any(entry[0] is not default for entry in _SAVE_GROUPS.values()):
        _SAVE_GROUPS.clear()  # groups of a destroyed default group are gone
    side = dist.new_group(
        ranks=sorted(dist.get_process_group_ranks(parent)),
        backend="gloo",
        timeout=SAVE_GROUP_TIMEOUT,
        use_local_synchronization=True,
    )
    _SAVE_GROUPS[parent] = (default, side)
    logger.debug("created the background-save group for %s", parent)
    return side


def rank_of(group: Group | None) -> int:
    import torch.distributed as dist

    return 0 if group is None else dist.get_rank(group)


def world_of(group: Group | None) -> int:
    import torch.distributed as dist

    return 1 if group is None else dist.get_world_size(group)


def global_rank(group: Group, group_rank: int) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(group, group_rank)


def broadcast_object(group: Group, value: T, src: int = 0, *, what: str = "a broadcast") -> T:
    """``value`` as group rank ``src`` has it, on every rank (a picklable object)."""
    import torch.distributed as dist

    box: list[Any] = [value]
    collective(
        group,
        what,
        lambda: dist.broadcast_object_list(box, src=global_rank(group, src), group=group),
    )
    return box[0]  # type: ignore[no-any-return]


def collective(group: Group, what: str, fn: Callable[[], T]) -> T:
    """Run the collective ``fn`` on ``group``; a broken group raises :class:`DistributedError`.

    A collective fails with the backend's bare ``RuntimeError`` (gloo: "Connection closed by
    peer", "Connection reset by peer", "Timed out") when a peer died (``kill -9``, the OOM
    killer) or stopped answering. That becomes a :class:`DistributedError` naming the group,
    the peer when it can be known, and the fix (see :func:`peer_lost`).
    """
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as exc:
        raise peer_lost(group, what, exc) from exc


def peer_lost(group: Group, what: str, error: BaseException) -> DistributedError:
    """The error for a collective on ``group`` that failed because a peer is gone.

    In a group of two the lost peer is the other rank; in a larger group the backend does not
    say which (gloo names an address), so the error is reported on this rank, naming the
    candidates.
    """
    rank, world = rank_of(group), world_of(group)
    others = [r for r in range(world) if r != rank]
    name = _group_name(group)
    cause = f"{type(error).__name__}: {_backend_message(error)}"
    fix = (
        "Fix: find why that process stopped (its own log; the kernel log for the OOM killer); "
        "this group cannot be used any more, so restart every rank and resume from the previous "
        "checkpoint, which a failed save leaves intact."
    )
    if len(others) == 1:
        message = f"disconnected from {name} or stopped answering ({cause}). {fix}"
        return DistributedError(what, {others[0]: message})
    message = (
        f"lost a peer of {name}: one of ranks {', '.join(map(str, others))} disconnected or "
        f"stopped answering ({cause}). {fix}"
    )
    return DistributedError(what, {rank: message})


def _backend_message(error: BaseException) -> str:
    """The backend's words without its source location and boilerplate."""
    text = str(error).split("\n", 1)[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]  # "[.../gloo/transport/tcp/pair.cc:553] "
    return text.split(" This is typically", 1)[0].rstrip(". ")[:200]


def _group_name(group: Group) -> str:
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group)
    members = (
        f"global ranks {ranks[0]}-{ranks[-1]}"
        if ranks == list(range(ranks[0], ranks[-1] + 1))
        else f"global ranks {ranks}"
    )
    if any(entry[1] is group for entry in _SAVE_GROUPS.values()):
        return f"the background-save side group (gloo, {members}; bigmodel's save_group)"
    return f"the process group ({members})"


def run_step(group: Group | None, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then exchange outcomes: any failure raises on every rank."""
    if group is None:
        return fn()
    import torch.distributed as dist

    result: T | None = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    mine = None if error is None else _describe(error)
    collective(group, what, lambda: dist.all_gather_object(outcomes, mine, group=group))
    failures = {rank: msg for rank, msg in enumerate(outcomes) if msg is not None}
    if failures:
        raise DistributedError(what, failures) from error
    return result  # type: ignore[return-value]


def _describe(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(error).__name__}: {error}{where}"


def mesh_device(target: torch.Tensor) -> torch.device:
    """The device of ``target``'s (a DTensor) mesh on this rank (the current CUDA device)."""
    mesh_type: str = target.device_mesh.device_type  # type: ignore[attr-defined]
    if mesh_type == "cuda":
        return torch.device(mesh_type, torch.cuda.current_device())
    return torch.device(mesh_type)


def local_shard(
    read_slice: Callable[[tuple[slice, ...]], torch.Tensor],
    target: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Build ``target``'s (a DTensor) local shard from only the bytes this rank owns.

    ``read_slice(index)`` returns that region of the stored tensor. Returns the new DTensor
    and the number of stored bytes read.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert isinstance(target, DTensor)
    shape, offset = compute_local_shape_and_global_offset(
        target.shape, target.device_mesh, target.placements
    )
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    data = read_slice(index) if all(shape) else torch.empty(shape)
    nbytes = data.numel() * data.element_size()
    local = data.to(device=device, dtype=dtype).contiguous()
    return (
        DTensor.from_local(
            local,
            target.device_mesh,
            target.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        ),
        nbytes,
    )


# -- replicated tensors -----------------------------------------------------------------------
def choose_strategy(strategy: str, *, on_cpu: bool, converting: bool) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)} "
            "(see bigmodel.DistributedOptions for what each does)."
        )
    if strategy != "auto":
        return strategy
    if not on_cpu:
        return "scatter"
    return "shm" if converting else "mmap"


def assign_owners(sizes: Sequence[int], world: int) -> list[int]:
    """Owner rank of each tensor: largest first onto the least-loaded rank (deterministic)."""
    loads = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += sizes[i]
    return owners


def broadcast_tensor(
    group: Group,
    tensor: torch.Tensor | None,
    *,
    src: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Send ``tensor`` from group rank ``src``; other ranks receive into a new tensor."""
    import torch.distributed as dist

    if tensor is None:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
    if tensor.numel():
        dist.broadcast(tensor, src=global_rank(group, src), group=group)
    return tensor


class NodeCopy:
    """Converted tensors written once per node into shared memory, mapped by every local rank."""

    def __init__(self, group: Group) -> None:
        import torch.distributed as dist

        me = (socket.gethostname(), new_token())
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, me, group=group)
        rank = dist.get_rank(group)
        leader = min(r for r, (host, _) in enumerate(everyone) if host == me[0])
        self.is_leader = rank == leader
        self.token = everyone[leader][1]
        self.folder: Path | None = None
        self.readers: dict[str, SafetensorsFile] = {}

    def write(self, items: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> None:
        """Leader only: write (key, stored tensor, target dtype), one file per target dtype.

        The stored tensors are views of the checkpoint's mapping; each is converted as it is
        written, so the leader holds one converted tensor at a time.
        """
        items = list(items)
        need = sum(t.numel() * dtype.itemsize for _, t, dtype in items)
        folder = _shared_folder(need) / f"bigmodel-{self.token}"
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        write_converted(folder, items, label="node-copy")
        (folder / "done").write_text("ok")

    def open(self) -> None:
        """Every rank: map the files the node's leader wrote."""
        if self.folder is None:
            self.folder = _find_shared(self.token)
        for path in sorted(self.folder.glob("*.safetensors")):
            reader = SafetensorsFile(path)
            for key in reader.names():
                self.readers[key] = reader

    def get(self, key: str) -> torch.Tensor:
        return self.readers[key].get_tensor(key)

    def remove(self) -> None:
        """Leader only, after every rank has mapped the files: their pages live on in the mappings."""
        if self.is_leader and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


_SHM = Path("/dev/shm")


def _shared_folder(need: int) -> Path:
    if _SHM.is_dir() and os.access(_SHM, os.W_OK):
        free = shutil.disk_usage(_SHM).free
        if free >= need * 1.05:
            return _SHM
        logger.warning(
            "/dev/shm has %d bytes free, %d needed: converting into %s instead (on disk)",
            free,
            need,
            tempfile.gettempdir(),
        )
    return Path(tempfile.gettempdir())


def _find_shared(token: str) -> Path:
    for base in (_SHM, Path(tempfile.gettempdir())):
        candidate = base / f"bigmodel-{token}"
        if (candidate / "done").exists():
            return candidate
    raise FileNotFoundError(
        f"bigmodel-{token} (the converted copy written by this node's first rank) is in neither "
        f"{_SHM} nor {tempfile.gettempdir()}; do the ranks of this node share those folders?"
    )
