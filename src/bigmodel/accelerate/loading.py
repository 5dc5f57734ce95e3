"""accelerate's ``load_checkpoint_in_model`` and ``load_checkpoint_and_dispatch`` on
:func:`bigmodel.load_checkpoint`: each tensor goes from the file straight to its device and
dtype (a view of the file mapping when nothing changes), ``disk`` modules are read from the
checkpoint itself when they run, and the accelerate defaults apply: ``strict=False``, unused
checkpoint keys warned about by name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.accelerate.dispatching import DeviceMap, dispatch_model
from bigmodel.accelerate.hooks import register
from bigmodel.accelerate.planning import get_balanced_memory, infer_auto_device_map
from bigmodel.api.load import load_checkpoint
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import KeyMismatchError, LoadStateDictError
from bigmodel.foundations.types import LoadReport
from bigmodel.placement.device_map import normalize_device_map

__all__ = ["load_checkpoint_and_dispatch", "load_checkpoint_in_model"]

_PLANNED = ("auto", "balanced", "balanced_low_0", "sequential")


def _fp32_overrides(
    model: nn.Module, keep: Iterable[str] | None, dtype: torch.dtype | None
) -> dict[str | type[nn.Module], torch.dtype]:
    """accelerate's ``keep_in_fp32_modules``: with ``dtype=float16``, the modules whose dotted
    name contains one of ``keep`` as a whole component stay in float32."""
    if not keep or dtype != torch.float16:
        return {}
    return {
        name: torch.float32
        for name, _ in model.named_modules()
        if name and any(f".{k}." in f".{name}." for k in keep)
    }


def _warn_keys(report: LoadReport, checkpoint: object, model: nn.Module) -> None:
    kind = type(model).__name__
    if report.unexpected_keys:
        warnings.warn(
            f"Some weights of the model checkpoint at {checkpoint} were not used when "
            f"initializing {kind}: {sorted(report.unexpected_keys)}. This may or may not be an "
            "issue: make sure the checkpoint holds no unneeded tensors and the model definition "
            "matches it.",
            stacklevel=3,
        )
    if report.missing_keys:
        warnings.warn(
            f"Some weights of {kind} were not in the checkpoint at {checkpoint} and were "
            f"initialised by their modules: {sorted(report.missing_keys)}.",
            stacklevel=3,
        )


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: DeviceMap | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: list[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> None:
    """Load ``checkpoint`` (a weights file, an index, or a folder) into ``model``, each tensor
    onto its ``device_map`` device and cast to ``dtype`` (floating-point tensors only);
    ``keep_in_fp32_modules`` stay float32 under ``dtype=float16``. With ``strict=False``
    (accelerate's default) unused checkpoint keys are warned about by name; ``strict=True``
    raises :class:`~bigmodel.LoadStateDictError` (a ``RuntimeError``, as torch's) listing every
    mismatch before anything is read. Tied weights stay tied.

    Differs from accelerate: the model can run at once (``disk`` modules are read from the
    checkpoint by hooks; :func:`dispatch_model` after it re-hooks without reading again);
    missing weights are initialised by their modules and warned about by name (accelerate
    leaves them on ``meta`` silently under a device map); safetensors is preferred to
    ``pytorch_model.bin`` when a folder has both; ``offload_folder`` may be omitted; the CPU
    part is never written to disk, so ``offload_state_dict`` has nothing to do;
    ``full_state_dict`` and ``broadcast_from_rank0`` are accepted (a distributed load reads once
    per node, see :func:`bigmodel.load_checkpoint`); ``offload_8bit_bnb`` is refused.
    """
    del offload_state_dict, offload_buffers, full_state_dict, broadcast_from_rank0
    if offload_8bit_bnb:
        raise ValueError(
            "load_checkpoint_in_model(offload_8bit_bnb=True): bitsandbytes 8-bit offload is not "
            "supported by bigmodel.accelerate; use accelerate itself for quantized weights."
        )
    target = parse_dtype(dtype)
    resolved = None if device_map is None else normalize_device_map(device_map)
    try:
        report = load_checkpoint(
            model,
            checkpoint,
            dtype=target,
            strict=strict,
            device_map=resolved,
            offload_folder=offload_folder,
            dtype_overrides=_fp32_overrides(model, keep_in_fp32_modules, target),
        )
    except KeyMismatchError as exc:
        raise LoadStateDictError.of(exc).with_traceback(exc.__traceback__) from None
    _warn_keys(report, checkpoint, model)
    if resolved is not None:
        register(model)


def _planned_map(
    model: nn.Module,
    device_map: str,
    max_memory: Mapping[Any, int | str | None] | None,
    no_split_module_classes: list[str] | None,
    dtype: str | torch.dtype | None,
    offload_buffers: bool,
) -> dict[str, int | str]:
    if device_map not in _PLANNED:
        raise ValueError(
            f"device_map={device_map!r}: a string device_map must be one of "
            f"{', '.join(map(repr, _PLANNED))}; or pass a dict {{module name: device}}."
        )
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return dict(
        infer_auto_device_map(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            offload_buffers=offload_buffers,
        )
    )


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: str | DeviceMap | None = None,
    max_memory: Mapping[Any, int | str | None] | None = None,
    no_split_module_classes: list[str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> nn.Module:
    """Load ``checkpoint`` into ``model`` and dispatch it, as accelerate does:
    ``device_map="auto"``/``"balanced"``/``"balanced_low_0"`` plan over
    :func:`get_balanced_memory`'s budgets, ``"sequential"`` over ``max_memory`` as given (both
    with :func:`infer_auto_device_map`); a dict is used as is; ``None`` only loads. Then
    :func:`load_checkpoint_in_model` and :func:`dispatch_model`. Returns the model.

    Differs from accelerate as those functions do (see their docstrings)."""
    if isinstance(device_map, str):
        device_map = _planned_map(
            model, device_map, max_memory, no_split_module_classes, dtype, offload_buffers
        )
    load_checkpoint_in_model(
        model,
        checkpoint,
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        offload_state_dict=bool(offload_state_dict),
        offload_buffers=offload_buffers,
        strict=strict,
        full_state_dict=full_state_dict,
        broadcast_from_rank0=broadcast_from_rank0,
    )
    if device_map is None:
        return model
    return dispatch_model(
        model,
        device_map=device_map,
        offload_dir=offload_folder,
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
    )
