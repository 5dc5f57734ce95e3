"""Loading a checkpoint into a module, tensor by tensor, straight into place.

Call order inside :func:`load_checkpoint`:

1. open and validate the checkpoint (headers only);
2. match its keys to the module's (``key_mapping``, whole-model prefix) and check shapes —
   a strict load that fails raises here, before any weight is touched;
3. read each tensor in file order and put it in place: converted to its final dtype and
   device in one step and *assigned* to the module (a same-dtype CPU tensor stays a view of
   the file mapping: zero copy). Tied names receive the same tensor once;
4. materialise and initialise only the tensors the checkpoint lacked;
5. check that nothing is left on ``meta``.

At most one converted tensor is in flight beyond the final model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ._errors import BigModelError, InvalidCheckpointError, KeyMismatchError
from ._log import logger
from ._progress import progress_bar
from ._units import parse_size
from .checkpoint import Checkpoint, open_checkpoint
from .device_map import device_for, execution_device, infer_device_map, normalize_device
from .dispatch import attach_offload_hooks
from .distributed import (
    Group,
    NodeCopy,
    assign_owners,
    broadcast_tensor,
    choose_strategy,
    is_dtensor,
    local_shard,
    rank_of,
    resolve_group,
    run_step,
    world_of,
)
from .initialize import InitFn, initialize_missing
from .keys import match_keys
from .offload import OffloadedTensor, offload_sources
from .pread import pick_io, pread_tensors

__all__ = [
    "DtypeOverrides",
    "LoadReport",
    "MetaTensorError",
    "MismatchedKey",
    "load_checkpoint",
    "load_sharded_checkpoint",
]

#: Per-module dtype overrides: a module class, or a dotted module name (matched on dot boundaries).
DtypeOverrides = Mapping[str | type[nn.Module], torch.dtype]


class MetaTensorError(BigModelError, ValueError):
    """A load would leave a parameter or buffer on the ``meta`` device (no data)."""

    code = "left-on-meta"


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
    bytes_read: int = 0
    seconds: float = 0.0


def _tie_groups(targets: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of the module's state grouped by tensor object (a tied weight appears under several)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    else:
        module._buffers[leaf] = value


def _place(model: nn.Module, names: list[str], old: torch.Tensor, value: torch.Tensor) -> None:
    new: torch.Tensor = (
        nn.Parameter(value, requires_grad=old.requires_grad)
        if isinstance(old, nn.Parameter)
        else value
    )
    for name in names:
        _set_tensor(model, name, new)


@dataclass(frozen=True)
class _Placement:
    """Final dtype and device policy."""

    dtype: torch.dtype | None
    overrides: DtypeOverrides
    device: torch.device | None
    model: nn.Module
    device_map: Mapping[str, str] | None = None

    def dtype_for(self, name: str, current: torch.Tensor) -> torch.dtype:
        """Floating-point tensors take ``dtype`` (or a per-module override); others keep the module's."""
        if not current.dtype.is_floating_point or (self.dtype is None and not self.overrides):
            return current.dtype
        owner = name.rpartition(".")[0]
        module = self.model.get_submodule(owner)
        for selector, dtype in self.overrides.items():
            if isinstance(selector, str):
                if owner == selector or owner.startswith(selector + ".") or selector == "":
                    return dtype
            elif isinstance(module, selector):
                return dtype
        return self.dtype if self.dtype is not None else current.dtype

    def device_for(self, name: str, current: torch.Tensor) -> torch.device:
        if self.device_map is not None:
            mapped = device_for(name, self.device_map)
            if mapped is None:
                raise ValueError(
                    f"The device map places no entry over {name!r}; add it (or an ancestor module, or '') to device_map."
                )
            return torch.device("cpu" if mapped == "disk" else mapped)
        if self.device is not None:
            return self.device
        return torch.device("cpu") if current.is_meta else current.device

    def offloaded(self, name: str) -> bool:
        return self.device_map is not None and device_for(name, self.device_map) == "disk"


def _open(
    checkpoint: str | os.PathLike[str] | Checkpoint, opts: _Options
) -> tuple[Checkpoint, bool]:
    if isinstance(checkpoint, Checkpoint):
        if opts.verify:
            result = checkpoint.verify()
            if result.problems:
                raise InvalidCheckpointError(result.problems)
        return checkpoint, False
    return open_checkpoint(checkpoint, prefer_safe=opts.prefer_safe, verify=opts.verify), True


def _check_nothing_on_meta(model: nn.Module, skip: frozenset[str] = frozenset()) -> None:
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


@dataclass(frozen=True)
class _Options:
    """Policy of one load; ``assign`` replaces tensors (load_checkpoint) instead of copying
    into materialised ones (the Hugging Face semantics of load_sharded_checkpoint)."""

    strict: bool
    prefer_safe: bool
    assign: bool
    detect_prefix: bool
    ignore_mismatched_sizes: bool
    init_missing: bool
    key_mapping: Mapping[str, str] | None = None
    init_fn: InitFn | None = None
    progress: bool | None = None
    verify: bool = False
    offload_folder: str | os.PathLike[str] | None = None
    main_device: str | int | None = None
    prefetch: bool | int | str = True
    process_group: Group | None = None
    strategy: str = "auto"
    io: str = "auto"
    io_inflight_bytes: int = 256 * 2**20


_Plan = list[tuple[str, list[str]]]  # (checkpoint key, module names sharing one tensor)


def _plan(
    ckpt: Checkpoint, targets: dict[str, torch.Tensor], opts: _Options
) -> tuple[_Plan, list[list[str]], LoadReport]:
    """Match keys and shapes from the headers alone; raise before anything is loaded."""
    keys = match_keys(
        ckpt.keys(), targets, key_mapping=opts.key_mapping, detect_prefix=opts.detect_prefix
    )
    from_model = {m: c for c, m in keys.to_model.items()}
    report = LoadReport(checkpoint=str(ckpt.path), renamed_keys=keys.renamed, prefix=keys.prefix)
    if keys.prefix:
        logger.info("checkpoint %s: %s to match the model's key names", ckpt.path, keys.prefix)
    plan: _Plan = []
    to_init: list[list[str]] = []
    for group in _tie_groups(targets):
        tensor = targets[group[0]]
        source = None
        mismatched = False
        for name in group:
            if name not in from_model:
                continue
            shape = ckpt.tensor_info(from_model[name]).shape
            if shape != tuple(tensor.shape):
                report.mismatched_keys.append(MismatchedKey(name, shape, tuple(tensor.shape)))
                mismatched = True
            elif source is None:
                source = from_model[name]
        if source is not None:
            plan.append((source, group))
        else:
            if not mismatched:
                report.missing_keys.extend(group)
            to_init.append(group)
    report.unexpected_keys = [c for c, m in keys.to_model.items() if m not in targets]
    # Like torch's load_state_dict, a shape mismatch is an error even when strict=False.
    bad_shapes = bool(report.mismatched_keys) and not opts.ignore_mismatched_sizes
    if bad_shapes or (opts.strict and (report.missing_keys or report.unexpected_keys)):
        raise KeyMismatchError(
            checkpoint=str(ckpt.path),
            missing_keys=report.missing_keys if opts.strict else (),
            unexpected_keys=report.unexpected_keys if opts.strict else (),
            mismatched=report.mismatched_keys if bad_shapes else (),
            can_ignore_mismatched=opts.assign,
        )
    order = {file: i for i, file in enumerate(ckpt.files)}
    plan.sort(key=lambda item: order[ckpt.tensor_info(item[0]).file])
    return plan, to_init, report


def _read(
    model: nn.Module,
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    plan: _Plan,
    placement: _Placement,
    opts: _Options,
    report: LoadReport,
    group: Group | None = None,
) -> None:
    """Read each planned tensor in file order and put it in place (one tensor in flight).

    Offloaded tensors are skipped (their hooks read them); DTensor targets get only this rank's
    slice; under a process group, replicated tensors follow ``opts.strategy``.
    """
    todo = [(k, g) for k, g in plan if not placement.offloaded(g[0])]
    sharded = [(k, g) for k, g in todo if is_dtensor(targets[g[0]])]
    replicated = [(k, g) for k, g in todo if not is_dtensor(targets[g[0]])]
    total = sum(ckpt.tensor_info(k).nbytes for k, _ in todo)
    with progress_bar(
        total=total, desc=f"Loading {ckpt.directory.name}", progress=opts.progress
    ) as bar:
        if sharded:
            run_step(
                group,
                f"reading this rank's shards of {ckpt.path}",
                lambda: _read_shards(model, ckpt, targets, sharded, placement, report, bar),
            )
        if group is None:
            fetch = _fetcher(ckpt, replicated, placement, targets, opts)
            _read_local(model, fetch, ckpt, targets, replicated, placement, opts, report, bar)
        elif replicated:
            _read_replicated(model, ckpt, targets, replicated, placement, opts, report, bar, group)


def _fetcher(
    ckpt: Checkpoint,
    items: _Plan,
    placement: _Placement,
    targets: dict[str, torch.Tensor],
    opts: _Options,
) -> Callable[[str], torch.Tensor]:
    """How the single-process path gets each stored tensor, by ``opts.io``.

    mmap: views of the mapping, after asking the kernel to read every planned tensor ahead in
    the background (views then do not fault page by page in the first forward pass, and
    conversions find their input cached). pread: parallel reads scheduled by bytes in flight (see ``bigmodel.pread``).
    """
    ranges = [ckpt.byte_range(key) for key, _ in items]
    io = pick_io(opts.io, ckpt.directory) if ranges and all(ranges) else "mmap"
    if io == "mmap":
        ckpt.prefetch(key for key, _ in items)  # background readahead, cold caches only pay
        return ckpt.get_tensor
    stream = pread_tensors(
        [r for r in ranges if r is not None], max_inflight_bytes=opts.io_inflight_bytes
    )

    def fetch(key: str) -> torch.Tensor:
        got, tensor = next(stream)
        assert got == key, (got, key)  # the stream follows the plan's order
        return tensor

    return fetch


def _read_local(
    model: nn.Module,
    fetch: Callable[[str], torch.Tensor],
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    items: _Plan,
    placement: _Placement,
    opts: _Options,
    report: LoadReport,
    bar: Any,
    *,
    counts: Callable[[str], bool] = lambda key: True,
) -> None:
    """The single-process path: ``fetch(key)`` gives the stored tensor (usually a file view)."""
    for key, group in items:
        old = targets[group[0]]
        data = fetch(key)
        if opts.assign or old.is_meta:
            value = data.to(
                device=placement.device_for(group[0], old),
                dtype=placement.dtype_for(group[0], old),
            )
            _place(model, group, old, value)
        else:
            with torch.no_grad():
                old.copy_(data)
        del data
        nbytes = ckpt.tensor_info(key).nbytes
        if counts(key):
            report.bytes_read += nbytes
        report.loaded_keys.append(key)
        bar.update(nbytes)


def _read_shards(
    model: nn.Module,
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    items: _Plan,
    placement: _Placement,
    report: LoadReport,
    bar: Any,
) -> None:
    """DTensor targets: read the slice each placement owns, never the whole tensor."""
    state: dict[str, torch.Tensor] = {}
    for key, group in items:
        old = targets[group[0]]
        mesh_type = old.device_mesh.device_type  # type: ignore[attr-defined]
        device = (
            torch.device(mesh_type, torch.cuda.current_device())
            if mesh_type == "cuda"
            else torch.device(mesh_type)
        )
        stored = ckpt.get_slice(key)
        value, nbytes = local_shard(
            lambda index, stored=stored: stored[index],  # type: ignore[misc]
            old,
            dtype=placement.dtype_for(group[0], old),
            device=device,
        )
        new = (
            nn.Parameter(value, requires_grad=old.requires_grad)
            if isinstance(old, nn.Parameter)
            else value
        )
        state.update(dict.fromkeys(group, new))
        report.bytes_read += nbytes
        report.loaded_keys.append(key)
        bar.update(ckpt.tensor_info(key).nbytes)
    # load_state_dict(assign=True) lets fully_shard / parallelize_module re-register their params
    model.load_state_dict(state, strict=False, assign=True)


def _read_replicated(
    model: nn.Module,
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    items: _Plan,
    placement: _Placement,
    opts: _Options,
    report: LoadReport,
    bar: Any,
    group: Group,
) -> None:
    """Plain tensors on every rank of ``group``, one copy per node where the target allows."""
    devices = {placement.device_for(g[0], targets[g[0]]).type for _, g in items}
    stored = {k: ckpt.tensor_info(k).dtype for k, _ in items}
    wanted = {k: placement.dtype_for(g[0], targets[g[0]]) for k, g in items}
    converted = {
        k
        for k in stored
        if stored[k] != wanted[k] and stored[k].is_floating_point and wanted[k].is_floating_point
    }
    strategy = choose_strategy(opts.strategy, on_cpu=devices == {"cpu"}, converting=bool(converted))
    logger.info("distributed load of %s: strategy %s", ckpt.path, strategy)
    if strategy == "mmap":
        run_step(
            group,
            f"loading {ckpt.path}",
            lambda: _read_local(
                model, ckpt.get_tensor, ckpt, targets, items, placement, opts, report, bar
            ),
        )
        return
    if strategy == "shm":
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
            lambda: _read_local(
                model,
                fetch,
                ckpt,
                targets,
                items,
                placement,
                opts,
                report,
                bar,
                counts=lambda key: key not in converted or node.is_leader,
            ),
        )
        return
    # scatter / rank0: each tensor is read by its owner and broadcast
    world, rank = world_of(group), rank_of(group)
    sizes = [ckpt.tensor_info(k).nbytes for k, _ in items]
    owners = assign_owners(sizes, world) if strategy == "scatter" else [0] * len(items)
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
                report.bytes_read += sizes[i]

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
        _place(model, names, old, value)
        report.loaded_keys.append(key)
        bar.update(sizes[i])


def _initialise(
    model: nn.Module,
    targets: dict[str, torch.Tensor],
    to_init: list[list[str]],
    placement: _Placement,
    opts: _Options,
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
            _place(model, group, old, empty)
            fresh.extend(group)
    return initialize_missing(model, fresh, init_fn=opts.init_fn) if fresh else []


def _load(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    placement: _Placement,
    opts: _Options,
) -> LoadReport:
    start = time.perf_counter()
    group = resolve_group(opts.process_group)
    ckpt, owned = run_step(group, f"opening {checkpoint}", lambda: _open(checkpoint, opts))
    offloaded: dict[str, OffloadedTensor] = {}
    try:
        targets = model.state_dict(keep_vars=True)
        plan, to_init, report = run_step(
            group, f"matching {ckpt.path} to the model", lambda: _plan(ckpt, targets, opts)
        )
        _read(model, ckpt, targets, plan, placement, opts, report, group)
        if placement.device_map is not None:
            offloaded = offload_sources(
                ckpt,
                targets,
                [(k, g) for k, g in plan if placement.offloaded(g[0])],
                placement.dtype_for,
                opts.offload_folder,
            )
    finally:
        if owned and not offloaded:
            ckpt.close()  # offloaded tensors keep reading from it
    if opts.init_missing:
        report.initialized_keys = _initialise(model, targets, to_init, placement, opts)
    if placement.device is not None:
        model.to(placement.device)
    _check_nothing_on_meta(model, skip=frozenset(offloaded))
    if placement.device_map is not None:
        attach_offload_hooks(
            model,
            offloaded,
            placement.device_map,
            execution_device=execution_device(placement.device_map, opts.main_device),
            prefetch=opts.prefetch,
        )
    report.seconds = time.perf_counter() - start
    if report.missing_keys or report.unexpected_keys or report.mismatched_keys:
        logger.info(
            "loaded %s: %d missing (%d initialised), %d unexpected, %d mismatched keys",
            report.checkpoint,
            len(report.missing_keys),
            len(report.initialized_keys),
            len(report.unexpected_keys),
            len(report.mismatched_keys),
        )
    return report


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    dtype_overrides: DtypeOverrides | None = None,
    device: torch.device | str | int | None = None,
    key_mapping: Mapping[str, str] | None = None,
    ignore_mismatched_sizes: bool = False,
    init_missing: bool = True,
    init_fn: InitFn | None = None,
    prefer_safe: bool = True,
    verify: bool = False,
    device_map: str | Mapping[str, str | int] | None = None,
    max_memory: Mapping[Any, int | str | None] | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    main_device: str | int | None = None,
    prefetch: bool | int | str = True,
    process_group: Any = None,
    strategy: str = "auto",
    io: str = "auto",
    io_inflight_bytes: int | str = "256MiB",
    progress: bool | None = None,
) -> LoadReport:
    """Load ``checkpoint`` (folder, index or weights file, or an open :class:`Checkpoint`) into ``model``.

    Works whether the module's tensors are on ``meta`` (see :func:`bigmodel.init_empty_weights`),
    materialised, or a mix. Each tensor goes from the file to its final ``device`` and dtype in
    one step and is assigned into the module; on CPU with an unchanged dtype it stays a view of
    the file mapping (no copy, no anonymous memory).

    * ``dtype`` casts floating-point tensors; integer and bool tensors keep theirs. Without it,
      each tensor takes the dtype the module declared. ``dtype_overrides`` maps a module class or
      a dotted module name to a dtype, e.g. ``{nn.LayerNorm: torch.float32}`` to keep norms in fp32.
    * ``device``: where tensors go (default: CPU for tensors on ``meta``, else where they are).
    * Keys: ``key_mapping`` maps regex -> replacement over checkpoint keys (first match wins);
      a whole-model prefix (``model.``, ``bert.``...) is added or removed when that is what
      makes the names match. Both are reported in ``LoadReport.renamed_keys``/``prefix``.
    * Tied parameters are read once and stay tied; storing one name of a tied pair is enough.
    * ``strict=True`` raises one :class:`~bigmodel.KeyMismatchError` listing every missing,
      unexpected and mis-shaped key before anything is loaded. A shape mismatch is an error
      unless ``ignore_mismatched_sizes=True``, which reports it and initialises that weight.
    * Tensors the checkpoint lacks are initialised by their module's own ``reset_parameters()``
      (or ``init_fn(module)``) — only those tensors; loaded weights are never initialised.
    * Afterwards no parameter or buffer is on ``meta``; if one would be,
      :class:`MetaTensorError` names it.
    * ``verify=True`` re-hashes every file against the digest recorded when it was saved
      before loading (see :meth:`bigmodel.Checkpoint.verify`).
    * ``device_map`` (``"auto"`` with ``max_memory``, or ``{module name: device}``) places
      modules on accelerators, ``cpu`` or ``disk``. Disk modules are not loaded: hooks read
      their weights just before they run and release them after (from the original shards,
      or, when a dtype change is needed, from converted copies written once into
      ``offload_folder``), reading ahead in a background thread up to ``prefetch`` bytes
      (``True``: the largest entry; ``False``: no read-ahead). Offloaded modules — and ``cpu``
      modules when an accelerator is in the map — run on ``main_device`` (default: the first
      accelerator, else ``cpu``); outputs come back to the device of the inputs.
    * ``io``: how bytes are read. ``"mmap"`` maps the files (zero copy when dtype and device
      match, and the kernel is asked to read the planned tensors ahead); ``"pread"`` reads with
      parallel ``preadv`` calls, at most ``io_inflight_bytes`` ahead of the tensor being placed
      (for network and FUSE filesystems, where page faults are slow); ``"auto"`` picks pread
      on such filesystems and mmap elsewhere. ``.bin`` files are always mapped by torch.
    * Under ``torch.distributed`` (an initialised default group, or ``process_group``) every
      rank calls this with the same arguments. Parameters that are DTensors (after
      ``fully_shard`` / ``parallelize_module`` on a meta model) get only this rank's slice.
      Plain tensors follow ``strategy``: ``"mmap"`` (every rank maps the files), ``"shm"`` (one
      rank per node converts into shared memory, the others map it), ``"scatter"`` (each rank
      reads a part, then broadcast), ``"rank0"`` (rank 0 reads, broadcasts); ``"auto"`` picks
      mmap for CPU without conversion, shm for CPU with one, scatter for accelerators. An error
      on any rank raises :class:`~bigmodel.DistributedError` on every rank. To load in one
      process while a group is initialised (say, rank 0 alone), pass ``process_group=False``.
    """
    resolved: dict[str, str] | None = None
    if device_map == "auto":
        resolved = infer_device_map(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
        )
    elif isinstance(device_map, str):
        raise ValueError(
            f"device_map={device_map!r}: pass 'auto' or a dict {{module name: device}}."
        )
    elif device_map is not None:
        resolved = {k: normalize_device(v) for k, v in device_map.items()}
    if resolved is not None and device is not None:
        raise ValueError("Pass either device= or device_map=, not both.")
    placement = _Placement(
        dtype=dtype,
        overrides=dtype_overrides or {},
        device=None if device is None else torch.device(device),
        model=model,
        device_map=resolved,
    )
    opts = _Options(
        strict=strict,
        prefer_safe=prefer_safe,
        assign=True,
        detect_prefix=True,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        init_missing=init_missing,
        key_mapping=key_mapping,
        init_fn=init_fn,
        progress=progress,
        verify=verify,
        offload_folder=offload_folder,
        main_device=main_device,
        prefetch=prefetch,
        process_group=process_group,
        strategy=strategy,
        io=io,
        io_inflight_bytes=parse_size(io_inflight_bytes),
    )
    return _load(model, checkpoint, placement, opts)


def load_sharded_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike[str],
    strict: bool = True,
    prefer_safe: bool = True,
    *,
    progress: bool | None = None,
) -> LoadReport:
    """Load the checkpoint in ``folder`` into ``model``: the drop-in for transformers' function.

    Keys are matched exactly (no prefix detection). Materialised tensors are filled in place
    with ``copy_`` (converted to their dtype; existing ``Parameter`` objects and optimizer
    references survive); tensors on ``meta`` are replaced by the file-backed tensors. With
    ``strict=True`` any missing, unexpected or mis-shaped key raises one
    :class:`~bigmodel.KeyMismatchError` listing them all, before anything is loaded. Extra
    memory is at most one tensor, none when dtypes match.
    """
    placement = _Placement(dtype=None, overrides={}, device=None, model=model)
    opts = _Options(
        strict=strict,
        prefer_safe=prefer_safe,
        assign=False,
        detect_prefix=False,
        ignore_mismatched_sizes=False,
        init_missing=True,
        progress=progress,
    )
    return _load(model, folder, placement, opts)
