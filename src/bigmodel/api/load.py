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

At most one converted tensor is in flight beyond the final model. Where each tensor goes is
:mod:`bigmodel.placement`; how the bytes are read (mmap, pread, DTensor slices, process
groups) is :mod:`bigmodel.reading`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.execution.distributed import Group, is_dtensor, resolve_group, run_step
from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import OffloadedTensor, offload_sources
from bigmodel.execution.reading import Plan, PlanReader
from bigmodel.foundations.errors import (
    InvalidCheckpointError,
    KeyMismatchError,
    MetaTensorError,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import LoadReport, MismatchedKey
from bigmodel.foundations.units import parse_size
from bigmodel.placement.device_map import execution_device, infer_device_map, normalize_device
from bigmodel.placement.initialize import InitFn, initialize_missing
from bigmodel.placement.keys import match_keys
from bigmodel.placement.policy import DtypeOverrides, Placement, place

__all__ = [
    "DtypeOverrides",
    "load_checkpoint",
    "load_sharded_checkpoint",
]


def _tie_groups(targets: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of the module's state grouped by tensor object (a tied weight appears under several)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


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


def _plan(
    ckpt: Checkpoint, targets: dict[str, torch.Tensor], opts: _Options
) -> tuple[Plan, list[list[str]], LoadReport]:
    """Match keys and shapes from the headers alone; raise before anything is loaded."""
    keys = match_keys(
        ckpt.keys(), targets, key_mapping=opts.key_mapping, detect_prefix=opts.detect_prefix
    )
    from_model = {m: c for c, m in keys.to_model.items()}
    report = LoadReport(checkpoint=str(ckpt.path), renamed_keys=keys.renamed, prefix=keys.prefix)
    if keys.prefix:
        logger.info("checkpoint %s: %s to match the model's key names", ckpt.path, keys.prefix)
    plan: Plan = []
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


def _initialise(
    model: nn.Module,
    targets: dict[str, torch.Tensor],
    to_init: list[list[str]],
    placement: Placement,
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
            place(model, group, old, empty)
            fresh.extend(group)
    return initialize_missing(model, fresh, init_fn=opts.init_fn) if fresh else []


def _load(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    placement: Placement,
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
        reader = PlanReader(
            model,
            ckpt,
            targets,
            placement,
            report,
            assign=opts.assign,
            io=opts.io,
            io_inflight_bytes=opts.io_inflight_bytes,
            strategy=opts.strategy,
            progress=opts.progress,
        )
        reader.read(plan, group)
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
    placement = Placement(
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
    placement = Placement(dtype=None, overrides={}, device=None, model=model)
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
