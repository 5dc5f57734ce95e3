"""Result and option types of the public verbs: plain data, no behaviour beyond properties.

Results say what a call did (:class:`LoadReport`, :class:`SaveResult`, :class:`VerifyResult`,
:class:`RewriteResult`; :class:`ShardedLoadReport` also unpacks as the ``(missing_keys,
unexpected_keys)`` pair of the torch/transformers functions it replaces); options group the
settings of one advanced concern of a load (:class:`OffloadOptions`,
:class:`DistributedOptions`, :class:`IOOptions`), so that the common call stays short and each
concern is documented in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, SupportsIndex, overload

from bigmodel.foundations.errors import Problem
from bigmodel.foundations.units import parse_size


class MismatchedKey(NamedTuple):
    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class LoadReport:
    """What a load did. Names are module keys; tied names filled through a partner are not missing."""

    checkpoint: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[MismatchedKey] = field(default_factory=list)
    #: Module tensors the checkpoint did not provide, initialised by their module's initialiser.
    initialized_keys: list[str] = field(default_factory=list)
    #: Checkpoint keys that were read.
    loaded_keys: list[str] = field(default_factory=list)
    #: Checkpoint key -> module key, for every key whose name changed.
    renamed_keys: dict[str, str] = field(default_factory=dict)
    #: ``"removed 'model.'"`` or ``"added 'model.'"`` if a whole-model prefix was detected.
    prefix: str | None = None
    #: Keys neither loaded nor counted as missing/unexpected because the model says they may be
    #: (a legacy key naming a non-persistent buffer, or one the model's
    #: ``_keys_to_ignore_on_load_unexpected``/``_missing`` patterns match) -> why.
    ignored_keys: dict[str, str] = field(default_factory=dict)
    #: Module key -> the checkpoint keys it was built from, for tensors the model's conversions
    #: (transformers' fused MoE experts, split projections...) build from several.
    converted_keys: dict[str, list[str]] = field(default_factory=dict)
    #: Module keys kept on disk (a device map's ``disk`` entries): not read by the load, read
    #: by their hooks when their module runs.
    offloaded_keys: list[str] = field(default_factory=list)
    #: Bytes of tensor data this load read: made resident and mapped (a file view), or copied
    #: into memory the model owns (a cast, a device copy, ``io="pread"``, a remote read), once
    #: per stored tensor. Offloaded tensors are not read by the load (their hooks read them
    #: when their module runs) and are not counted; under ``torch.distributed``, only what
    #: this rank read.
    bytes_read: int = 0
    #: Of :attr:`bytes_read`, the bytes that were already in the page cache when the load
    #: started (``mincore``; counted for mapped reads only): equal to it on a warm load, 0 on
    #: a cold one.
    cached_bytes: int = 0
    #: Wall time of the read phase: from the first read to the last tensor in place with its
    #: pages resident (planning, initialisation and hooks excluded).
    read_seconds: float = 0.0
    #: Wall time of the whole load.
    seconds: float = 0.0

    @property
    def read_rate(self) -> float:
        """:attr:`bytes_read` / :attr:`read_seconds`, in bytes per second (0.0 when nothing
        was read)."""
        return self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0


class ShardedLoadReport(LoadReport):
    """The :class:`LoadReport` of :func:`bigmodel.load_sharded_checkpoint`, which is also the
    ``(missing_keys, unexpected_keys)`` pair that torch's ``load_state_dict`` and transformers'
    ``load_sharded_checkpoint`` return (their ``_IncompatibleKeys`` named tuple):
    ``missing, unexpected = report``, ``report[0]``, ``len(report) == 2``,
    ``report == (missing, unexpected)``, ``report._asdict()``. Every LoadReport field stays."""

    _fields = ("missing_keys", "unexpected_keys")

    @classmethod
    def of(cls, report: LoadReport) -> ShardedLoadReport:
        return cls(**{f.name: getattr(report, f.name) for f in fields(report)})

    def _pair(self) -> tuple[list[str], list[str]]:
        return (self.missing_keys, self.unexpected_keys)

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self._pair())

    def __len__(self) -> int:
        return 2

    @overload
    def __getitem__(self, index: SupportsIndex) -> list[str]: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[list[str], ...]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> list[str] | tuple[list[str], ...]:
        return self._pair()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, tuple):
            return self._pair() == other
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def _asdict(self) -> dict[str, list[str]]:
        return dict(zip(self._fields, self._pair(), strict=True))


@dataclass(frozen=True)
class SaveResult:
    """What a save wrote. ``files`` are weight file names relative to ``directory``."""

    directory: Path
    files: list[str]
    index_file: str | None
    total_size: int
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`Checkpoint.verify`: files whose digest matched, files with no digest
    recorded (only structural checks apply to them), and every problem found."""

    verified: list[str]
    unverified: list[str]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RewriteResult:
    saved: SaveResult
    source_format: str
    copied_files: list[str]


#: Ways to read a checkpoint's bytes (see :class:`IOOptions`).
IO_MODES = ("auto", "mmap", "pread")
#: Ways ranks share replicated tensors in a distributed load (see :class:`DistributedOptions`).
STRATEGIES = ("auto", "mmap", "shm", "scatter", "rank0")


@dataclass(frozen=True)
class OffloadOptions:
    """How a model runs when its device map keeps modules on ``cpu`` or ``disk``.

    Used by :func:`bigmodel.load_checkpoint` (``offload=``) and :func:`bigmodel.dispatch_model`
    together with ``device_map`` and ``offload_folder``.

    * ``main_device``: where offloaded modules run and where outputs are returned (default:
      the first accelerator of the map, else ``cpu``).
    * ``prefetch``: how far the hooks read ahead of the module that runs. ``True`` (default)
      reads up to the size of the largest device-map entry ahead, so reading overlaps compute
      with a fixed amount of memory in flight; ``False`` reads each entry when it runs; a size
      (``"512MB"`` or a number of bytes) sets the bound.
    """

    main_device: str | int | None = None
    prefetch: bool | int | str = True

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, bool):
            parse_size(self.prefetch)  # a bad size fails here, before anything is loaded

    @property
    def prefetch_bytes(self) -> int | None:
        """The read-ahead bound in bytes; None means "the largest entry"."""
        if self.prefetch is True:
            return None
        if self.prefetch is False:
            return 0
        return parse_size(self.prefetch)


@dataclass(frozen=True)
class DistributedOptions:
    """How a load coordinates with other processes under ``torch.distributed``.

    * ``process_group``: the group whose ranks all call the load (default: the default group,
      when one is initialised). ``False`` loads in this process alone whatever is initialised
      (say, on rank 0 only).
    * ``strategy`` for replicated (plain) tensors: ``"mmap"`` (every rank maps the files; one
      page-cache copy per node), ``"shm"`` (one rank per node converts into shared memory, the
      others map it), ``"scatter"`` (each rank reads a part, then broadcasts), ``"rank0"``
      (rank 0 reads everything and broadcasts); ``"auto"`` picks mmap for CPU loads without a
      conversion, shm for CPU loads with one, scatter for accelerators. Sharded (DTensor)
      parameters always read only this rank's slice.
    """

    process_group: Any = None
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)} "
                "(see bigmodel.DistributedOptions for what each does)."
            )


@dataclass(frozen=True)
class IOOptions:
    """How a load reads bytes. ``load_checkpoint(io="pread")`` is short for
    ``io=IOOptions(mode="pread")``.

    * ``mode``: ``"mmap"`` maps the files (zero copy when dtype and device match) and makes
      every planned tensor resident in file order from a background thread, so that the load
      returns with every page in memory and casts run on resident pages while the next
      tensors are read; ``"pread"`` reads with parallel ``preadv`` calls (for network and
      FUSE filesystems, where page faults are slow); ``"auto"`` picks pread on such
      filesystems (by ``statfs`` magic) and mmap elsewhere. ``.bin`` files are always mapped
      by torch.
      A pread load owns its memory: the files may change afterwards without affecting the
      model, where a mapped (zero-copy) model must never see its files modified in place.
    * ``inflight_bytes``: how far reads may run ahead of the tensor being placed (pread; and
      mmap when the planned bytes exceed what the page cache can hold).
    """

    mode: str = "auto"
    inflight_bytes: int | str = "256MiB"

    def __post_init__(self) -> None:
        if self.mode not in IO_MODES:
            raise ValueError(f"io={self.mode!r}: choose one of {', '.join(IO_MODES)}.")
        parse_size(self.inflight_bytes)  # a bad size fails here, before anything is read

    @property
    def inflight(self) -> int:
        return parse_size(self.inflight_bytes)

    @classmethod
    def of(cls, io: str | IOOptions) -> IOOptions:
        return io if isinstance(io, IOOptions) else cls(mode=io)


@dataclass(frozen=True)
class RemoteOptions:
    """How remote files are read.

    * ``retries``: attempts after the first, for a transient failure (connection reset, 5xx,
      throttling, a body cut short), with exponential backoff from ``backoff`` seconds (up to
      ``max_backoff``) and jitter.
    * ``timeout``: seconds one request may take.
    * ``threads`` and ``chunk_bytes``: concurrent range requests, and the most bytes one
      asks for (adjacent tensors are read together up to it; a larger tensor is split).
    * ``cache_dir``: a local folder where the files read are kept, validated by size and
      digest, and reused by the next load (see :mod:`bigmodel.storage.remote_cache`).
    """

    retries: int = 5
    backoff: float = 0.1
    max_backoff: float = 10.0
    timeout: float = 120.0
    threads: int = 16
    chunk_bytes: int = 16 * 2**20
    cache_dir: str | os.PathLike[str] | None = None
