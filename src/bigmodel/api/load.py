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

Every page of a mapped load is resident when it returns (read in file order from a background
thread that starts before step 2). At most one converted tensor is in flight beyond the final
model. Where each tensor goes is
:mod:`bigmodel.placement` (the plan of step 2 is :mod:`bigmodel.placement.load_plan`); how
the bytes are read (mmap, pread, DTensor slices, process groups) is
:mod:`bigmodel.execution.reading`; offload hooks are :mod:`bigmodel.execution.offload`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint, config_dtype, first_floating_dtype
from bigmodel.checkpoint.naming import SAFE_INDEX_NAME, WEIGHTS_INDEX_NAME
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.execution.distributed import Group, resolve_group, run_step
from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import OffloadedTensor, offload_sources
from bigmodel.execution.reading import MappedRead, PlanReader, read_derived, start_early_read
from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.dtypes import is_auto, parse_dtype
from bigmodel.foundations.errors import (
    InvalidCheckpointError,
    KeyMismatchError,
    LoadStateDictError,
    PlanError,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import (
    DistributedOptions,
    IOOptions,
    LoadReport,
    OffloadOptions,
    RemoteOptions,
    ShardedLoadReport,
)
from bigmodel.placement.conversions import model_conversions
from bigmodel.placement.device_map import (
    execution_device,
    infer_device_map,
    normalize_device_map,
    set_hf_device_map,
)
from bigmodel.placement.initialize import InitFn, check_nothing_on_meta, materialize_missing
from bigmodel.placement.load_plan import LoadPlan, MatchRules, ignore_rules, plan_load
from bigmodel.placement.policy import DtypeOverrides, Placement, keep_in_fp32

__all__ = ["DtypeOverrides", "load_checkpoint", "load_sharded_checkpoint"]


@dataclass(frozen=True)
class _Options:
    """Policy of one load; ``assign`` replaces tensors (load_checkpoint) instead of copying
    into materialised ones (the Hugging Face semantics of load_sharded_checkpoint)."""

    rules: MatchRules
    assign: bool
    prefer_safe: bool = True
    verify: bool = False
    init_missing: bool = True
    init_fn: InitFn | None = None
    progress: bool | None = None
    offload_folder: str | os.PathLike[str] | None = None
    offload: OffloadOptions = field(default_factory=OffloadOptions)
    # the blocks offload materialises whole (None: the repeated block classes, as the planner)
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    io: IOOptions = field(default_factory=IOOptions)
    remote: RemoteOptions | None = None


def _open(
    checkpoint: str | os.PathLike[str] | Checkpoint, opts: _Options
) -> tuple[Checkpoint, bool]:
    """The open checkpoint, and whether this load opened it (and so must close it)."""
    if isinstance(checkpoint, Checkpoint):
        if opts.verify:
            result = checkpoint.verify()
            if result.problems:
                raise InvalidCheckpointError(result.problems)
        return checkpoint, False
    ckpt = open_checkpoint(
        checkpoint, prefer_safe=opts.prefer_safe, verify=opts.verify, remote=opts.remote
    )
    return ckpt, True


def _read(
    model: nn.Module,
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    placement: Placement,
    opts: _Options,
    group: Group | None,
) -> tuple[LoadPlan, dict[str, OffloadedTensor]]:
    """Plan from the headers, read what is resident, describe what is offloaded.

    A load that reads every tensor through the mapping starts reading before it plans (see
    :func:`~bigmodel.execution.reading.start_early_read`), so the disk is busy while keys are
    matched; the read phase (``LoadReport.read_seconds``) starts there."""
    start = time.perf_counter()
    whole = group is None and placement.device_map is None
    early = start_early_read(ckpt, opts.io, whole=whole)
    try:
        return _plan_and_read(model, ckpt, targets, placement, opts, group, early, start)
    finally:
        if early is not None:
            early.cancel()  # returns at once when done; on failure stops reading


def _plan_and_read(
    model: nn.Module,
    ckpt: Checkpoint,
    targets: dict[str, torch.Tensor],
    placement: Placement,
    opts: _Options,
    group: Group | None,
    early: MappedRead | None,
    start: float,
) -> tuple[LoadPlan, dict[str, OffloadedTensor]]:
    rules = opts.rules
    if opts.assign:  # the model's own layout conversions (a transformers model)
        conversions = model_conversions(model, ckpt.keys(), rules.key_mapping)
        rules = dataclasses.replace(rules, conversions=conversions)
    plan = run_step(
        group, f"matching {ckpt.path} to the model", lambda: plan_load(ckpt, targets, rules)
    )
    reader = PlanReader(
        model,
        ckpt,
        targets,
        placement,
        plan.report,
        assign=opts.assign,
        io=opts.io,
        strategy=opts.distributed.strategy,
        progress=opts.progress,
        mapped=early,
    )
    reader.read(plan.items, group)
    offloaded: dict[str, OffloadedTensor] = {}
    if plan.derived:
        offloaded = run_step(
            group,
            f"converting {ckpt.path}",
            lambda: read_derived(reader, plan.derived, opts.offload_folder),
        )
    plan.report.read_seconds = time.perf_counter() - start
    if placement.device_map is not None:
        offloaded |= offload_sources(
            ckpt,
            targets,
            [(k, g) for k, g in plan.items if placement.offloaded(g[0])],
            placement.dtype_for,
            opts.offload_folder,
            inflight_bytes=opts.io.inflight,
        )
    return plan, offloaded


def _finish(
    model: nn.Module,
    targets: dict[str, torch.Tensor],
    plan: LoadPlan,
    offloaded: dict[str, OffloadedTensor],
    placement: Placement,
    opts: _Options,
) -> None:
    """Initialise what the checkpoint lacked, check nothing is left on meta, attach hooks."""
    report = plan.report
    if opts.init_missing:
        report.initialized_keys = materialize_missing(
            model, targets, plan.to_init, placement, opts.init_fn
        )
    if placement.device is not None:
        model.to(placement.device)
    check_nothing_on_meta(model, skip=frozenset(offloaded))
    if placement.device_map is not None:
        attach_offload_hooks(
            model,
            offloaded,
            placement.device_map,
            execution_device=execution_device(placement.device_map, opts.offload.main_device),
            prefetch=opts.offload.prefetch,
            block_classes=opts.no_split_module_classes,
        )
        set_hf_device_map(model, placement.device_map)


def _load(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    placement: Placement,
    opts: _Options,
) -> LoadReport:
    start = time.perf_counter()
    group = resolve_group(opts.distributed.process_group)
    ckpt, owned = run_step(group, f"opening {checkpoint}", lambda: _open(checkpoint, opts))
    offloaded: dict[str, OffloadedTensor] = {}
    try:
        targets = model.state_dict(keep_vars=True)
        plan, offloaded = _read(model, ckpt, targets, placement, opts, group)
    finally:
        if owned and not offloaded:
            ckpt.close()  # offloaded tensors keep reading from it
    _finish(model, targets, plan, offloaded, placement, opts)
    report = plan.report
    report.offloaded_keys = sorted(offloaded)
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


def _auto_dtype(
    checkpoint: str | os.PathLike[str] | Checkpoint, remote: RemoteOptions | None = None
) -> torch.dtype | None:
    """``dtype="auto"``, as transformers resolves it: the dtype the checkpoint folder's
    config.json records (``dtype``, or the older ``torch_dtype``), else the dtype of the
    checkpoint's first floating-point tensor (None, keep every dtype, when it has none).
    A model built from a config no longer says which dtype it was saved in."""
    if isinstance(checkpoint, Checkpoint):
        folder = checkpoint.remote or checkpoint.directory
        return config_dtype(folder) or first_floating_dtype(checkpoint)
    with open_checkpoint(checkpoint, remote=remote) as ckpt:
        return config_dtype(ckpt.remote or ckpt.directory) or first_floating_dtype(ckpt)


def _resolve_device_map(
    model: nn.Module,
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None,
    *,
    max_memory: Mapping[Any, int | str | None] | None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None,
    dtype: torch.dtype | None,
    offload: OffloadOptions,
) -> dict[str, str] | None:
    """The device map of a load: ``"auto"``, ``"sequential"``, ``"balanced"`` and
    ``"balanced_low_0"`` plan one (see :func:`bigmodel.infer_device_map`, which keeps room on
    the execution device for ``offload``'s streaming), as accelerate's names do; one device
    (``"cpu"``, ``"disk"``, ``"cuda:1"``, ``0``) places the whole model there; a dict is
    normalised. An unknown device raises :class:`~bigmodel.PlanError` naming it."""
    if device_map is None:
        return None
    if isinstance(device_map, str) and device_map in _PLANNED:
        return infer_device_map(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            strategy=_PLANNED[device_map],
            offload=offload,
        )
    if isinstance(device_map, (str, int, torch.device)):
        try:
            return {"": normalize_device(device_map)}
        except PlanError as exc:
            raise PlanError(
                f"device_map={device_map!r}: pass "
                f"{', '.join(map(repr, _PLANNED))} (planned), one device ('cpu', 'disk', 'cuda:0' or an "
                f"accelerator index), or a dict {{module name: device}} [{PlanError.code}]."
            ) from exc
    return normalize_device_map(device_map)


#: Planning device_map names (accelerate's), and the planner strategy each means.
_PLANNED = {name: name for name in ("auto", "sequential", "balanced", "balanced_low_0")}


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    strict: bool = True,
    dtype_overrides: DtypeOverrides | None = None,
    key_mapping: Mapping[str, str] | None = None,
    ignore_mismatched_sizes: bool = False,
    init_missing: bool = True,
    init_fn: InitFn | None = None,
    prefer_safe: bool = True,
    verify: bool = False,
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None = None,
    max_memory: Mapping[Any, int | str | None] | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload: OffloadOptions | None = None,
    distributed: DistributedOptions | None = None,
    io: str | IOOptions = "auto",
    remote: RemoteOptions | None = None,
    progress: bool | None = None,
) -> LoadReport:
    """Load ``checkpoint`` (folder, index or weights file, or an open :class:`Checkpoint`) into ``model``.

    Works whether the module's tensors are on ``meta`` (see :func:`bigmodel.init_empty_weights`),
    materialised, or a mix. Each tensor goes from the file to its final ``device`` and dtype in
    one step and is assigned into the module; on CPU with an unchanged dtype it stays a view of
    the file mapping (no copy, no anonymous memory). From a local disk the files are read in
    order at the disk's rate from a background thread (started before keys are matched; casts
    run while the next tensors are read), and the call returns with every page of every
    loaded weight resident, so the first forward pass reads nothing. The returned
    :class:`~bigmodel.LoadReport` says how many bytes were read (``bytes_read``, of which
    ``cached_bytes`` were already cached) in how long (``read_seconds``, ``read_rate``).

    * ``dtype`` (a ``torch.dtype`` or a name: ``"bf16"``, ``"float16"``...) casts floating-point
      tensors; integer and bool tensors keep theirs. Without it,
      each tensor takes the dtype the module declared. ``dtype_overrides`` maps a module class or
      a dotted module name to a dtype, e.g. ``{nn.LayerNorm: torch.float32}`` to keep norms in fp32.
    * ``device``: where tensors go (default: CPU for tensors on ``meta``, else where they are).
    * Keys: ``key_mapping`` maps regex -> replacement over checkpoint keys (first match wins);
      a whole-model prefix (``model.``, ``bert.``...) is added or removed when that is what
      makes the names match. Both are reported in ``LoadReport.renamed_keys``/``prefix``.
      Tied parameters are read once and stay tied; storing one name of a tied pair is enough.
    * ``strict=True`` raises one :class:`~bigmodel.KeyMismatchError` listing every missing,
      unexpected and mis-shaped key before anything is loaded. A shape mismatch is an error
      unless ``ignore_mismatched_sizes=True``, which reports it and initialises that weight.
    * Tensors the checkpoint lacks are initialised by their module's own ``reset_parameters()``
      (or ``init_fn(module)``), only those; afterwards nothing is on ``meta``, or
      :class:`~bigmodel.MetaTensorError` names what is.
    * ``verify=True`` re-hashes every file against its recorded digest first.
    * ``device_map`` (``"auto"``/``"sequential"``/``"balanced"``/``"balanced_low_0"`` with
      ``max_memory`` and ``no_split_module_classes``, one device, or ``{module name: device}``)
      places modules on accelerators, ``cpu`` or ``disk``; ``LoadReport.offloaded_keys`` lists
      what stays on disk and ``model.hf_device_map`` is set as accelerate sets it (accelerator
      indexes as ``int``). A ``max_memory`` without ``"disk"`` offloads what fits nowhere else
      to disk, with a warning; ``"disk": 0`` forbids it. Disk modules are read by hooks just
      before they run (from the original shards, or from converted copies written once into
      ``offload_folder``); ``offload`` (:class:`~bigmodel.OffloadOptions`) sets where they run
      and how far reads run ahead, and a planned map keeps room for that on the accelerator
      that runs them. Offloaded tensors are read by *unit*: each instance of a class in
      ``no_split_module_classes`` (default: the repeated block classes) is one unit, read
      whole for its forward, so a block whose modules read each other's weights runs under
      any map; an offloaded tensor used outside its unit's forward raises
      :class:`~bigmodel.MetaTensorError` naming it (never uninitialised numbers).
    * ``io``: ``"auto"``, ``"mmap"``, ``"pread"``, or :class:`~bigmodel.IOOptions`.
    * ``checkpoint`` may be a URL (``https://host/model``, ``s3://bucket/model``; ``pip install
      'bigmodel[remote]'``): the same rules apply, tensors are read by concurrent range
      requests within ``io``'s in-flight bytes, and ``remote``
      (:class:`~bigmodel.RemoteOptions`) sets retries, timeouts, concurrency
      and a local ``cache_dir``.
    * Under ``torch.distributed`` every rank calls this with the same arguments; DTensor
      parameters get only this rank's slice, an error on any rank raises
      :class:`~bigmodel.DistributedError` on every rank, and ``distributed``
      (:class:`~bigmodel.DistributedOptions`) chooses the group and how replicated tensors
      are shared.
    """
    dtype = parse_dtype(dtype, auto=_auto_dtype(checkpoint, remote) if is_auto(dtype) else None)
    offload = offload or OffloadOptions()
    if no_split_module_classes is not None:  # read twice: by the planner and by the hooks
        no_split_module_classes = tuple(no_split_module_classes)
    resolved = _resolve_device_map(
        model,
        device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split_module_classes,
        dtype=dtype,
        offload=offload,
    )
    if resolved is not None and device is not None:
        raise ValueError("Pass either device= or device_map=, not both.")
    placement = Placement(
        dtype=dtype,
        overrides=dtype_overrides or {},
        device=None if device is None else torch.device(device),
        model=model,
        device_map=resolved,
        keep_fp32=keep_in_fp32(model, dtype),
    )
    opts = _Options(
        rules=MatchRules(
            strict=strict,
            key_mapping=key_mapping,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            ignore=ignore_rules(model),
        ),
        assign=True,
        prefer_safe=prefer_safe,
        verify=verify,
        init_missing=init_missing,
        init_fn=init_fn,
        progress=progress,
        offload_folder=offload_folder,
        offload=offload,
        no_split_module_classes=no_split_module_classes,
        distributed=distributed or DistributedOptions(),
        io=IOOptions.of(io),
        remote=remote,
    )
    return _load(model, checkpoint, placement, opts)


def _sharded_entry(folder: str | os.PathLike[str], prefer_safe: bool) -> str | os.PathLike[str]:
    """The index transformers' ``load_sharded_checkpoint`` reads in ``folder``: the safetensors
    index if present and (``prefer_safe`` or there is no ``.bin`` index), else the ``.bin``
    index. With neither (transformers raises ``ValueError``), ``folder`` itself, which
    :func:`~bigmodel.open_checkpoint` resolves to the single weights file."""
    safe, legacy = Path(folder, SAFE_INDEX_NAME), Path(folder, WEIGHTS_INDEX_NAME)
    safe_present, legacy_present = safe.is_file(), legacy.is_file()
    if safe_present and (prefer_safe or not legacy_present):
        return safe
    return legacy if legacy_present else folder


def load_sharded_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike[str],
    strict: bool = True,
    prefer_safe: bool = True,
    *,
    progress: bool | None = None,
) -> ShardedLoadReport:
    """Load the checkpoint in ``folder`` into ``model``: the drop-in for transformers' function
    (``transformers.trainer_utils.load_sharded_checkpoint``), with the same parameters.

    The file read is the one transformers picks: ``model.safetensors.index.json`` unless
    ``prefer_safe=False`` and ``pytorch_model.bin.index.json`` is present (or only that
    index is present). A folder with no index, which transformers refuses, loads its single
    ``model.safetensors`` or ``pytorch_model.bin``.

    Keys are matched exactly (no prefix detection). Materialised tensors are filled in place
    with ``copy_`` (converted to their dtype; existing ``Parameter`` objects and optimizer
    references survive); tensors on ``meta`` are replaced by the file-backed tensors. With
    ``strict=True`` any missing or unexpected key, and with any ``strict`` a mis-shaped key,
    raises one :class:`~bigmodel.LoadStateDictError` listing them all before anything is
    loaded: a :class:`~bigmodel.KeyMismatchError` that is also the ``RuntimeError``
    transformers raises. The result is a :class:`~bigmodel.ShardedLoadReport`: the full
    report, which also unpacks as ``missing_keys, unexpected_keys = ...`` like the
    ``_IncompatibleKeys`` transformers returns (missing keys in the model's
    ``state_dict()`` order; a tied name filled through its partner is not missing). Extra
    memory is at most one tensor, none when dtypes match.
    """
    placement = Placement(dtype=None, overrides={}, device=None, model=model)
    opts = _Options(
        rules=MatchRules(strict=strict, detect_prefix=False, can_ignore_mismatched=False),
        assign=False,
        prefer_safe=prefer_safe,
        progress=progress,
    )
    order = {name: i for i, name in enumerate(model.state_dict(keep_vars=True))}
    try:
        report = _load(model, _sharded_entry(folder, prefer_safe), placement, opts)
    except KeyMismatchError as exc:
        raise LoadStateDictError.of(exc).with_traceback(exc.__traceback__) from None
    report.missing_keys.sort(key=lambda name: order.get(name, len(order)))
    return ShardedLoadReport.of(report)
