"""Loading a checkpoint into an existing module, tensor by tensor.

The plan (which checkpoint key fills which module tensors) is computed and checked from the
headers alone, before any weight is touched, so a strict load that fails leaves the model
unchanged. Tensors are then read one at a time, in file order: a tensor of a materialised
module is filled with ``copy_`` (converting dtype on the fly, no temporary), and a tensor on
``meta`` is replaced by the file-backed tensor itself (zero-copy when the dtype matches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import KeyMismatchError
from ._log import logger
from ._progress import progress_bar
from .checkpoint import Checkpoint, open_checkpoint

__all__ = ["LoadReport", "load_sharded_checkpoint"]


@dataclass
class LoadReport:
    """What a load did. Tied names filled through their partner are not missing."""

    checkpoint: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    loaded_keys: list[str] = field(default_factory=list)


def _tie_groups(targets: dict[str, torch.Tensor]) -> list[list[str]]:
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


def _fill(model: nn.Module, names: list[str], target: torch.Tensor, source: torch.Tensor) -> None:
    """Put ``source`` into the module tensors ``names`` (all the same object ``target``)."""
    if target.device.type == "meta":
        value = source if source.dtype == target.dtype else source.to(target.dtype)
        new: torch.Tensor = (
            nn.Parameter(value, requires_grad=target.requires_grad)
            if isinstance(target, nn.Parameter)
            else value
        )
        for name in names:
            _set_tensor(model, name, new)
    else:
        with torch.no_grad():
            target.copy_(source)


def plan_load(model: nn.Module, ckpt: Checkpoint) -> tuple[dict[str, list[str]], LoadReport]:
    """Match checkpoint keys to module tensors: {checkpoint key: [module names]} and the report."""
    targets = model.state_dict(keep_vars=True)
    report = LoadReport(checkpoint=str(ckpt.path))
    plan: dict[str, list[str]] = {}
    for group in _tie_groups(targets):
        tensor = targets[group[0]]
        source = None
        for name in group:
            if name not in ckpt:
                continue
            if ckpt.tensor_info(name).shape != tuple(tensor.shape):
                report.mismatched_keys.append(name)
            elif source is None:
                source = name
        if source is None:
            report.missing_keys.extend(n for n in group if n not in report.mismatched_keys)
        else:
            plan[source] = group
    report.unexpected_keys = [k for k in ckpt if k not in targets]
    return plan, report


def load_checkpoint_into(
    model: nn.Module, ckpt: Checkpoint, plan: dict[str, list[str]], *, progress: bool | None
) -> list[str]:
    """Execute ``plan`` file by file; return the checkpoint keys that were loaded."""
    targets = model.state_dict(keep_vars=True)
    order = {file: i for i, file in enumerate(ckpt.files)}
    keys = sorted(plan, key=lambda k: order[ckpt.tensor_info(k).file])
    total = sum(ckpt.tensor_info(k).nbytes for k in keys)
    with progress_bar(total=total, desc=f"Loading {ckpt.directory.name}", progress=progress) as bar:
        for key in keys:
            names = plan[key]
            _fill(model, names, targets[names[0]], ckpt.get_tensor(key))
            bar.update(ckpt.tensor_info(key).nbytes)
    return keys


def load_sharded_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike[str],
    strict: bool = True,
    prefer_safe: bool = True,
    *,
    progress: bool | None = None,
) -> LoadReport:
    """Load the checkpoint in ``folder`` (sharded or not, safetensors or ``.bin``) into ``model``.

    The drop-in for ``transformers.modeling_utils.load_sharded_checkpoint``. Keys are matched
    exactly; a name tied to another in the model (the same ``Parameter`` under two names) is
    loaded once and is not missing when the checkpoint stores only its partner. With
    ``strict=True`` any missing, unexpected or mis-shaped key raises one
    :class:`~bigmodel.KeyMismatchError` listing them all, before anything is loaded.
    Extra memory is at most one tensor (none when dtypes match); tensors of a module on
    ``meta`` become views of the file mapping.
    """
    with open_checkpoint(folder, prefer_safe=prefer_safe) as ckpt:
        plan, report = plan_load(model, ckpt)
        # Like torch's load_state_dict, a shape mismatch is an error even when strict=False.
        if report.mismatched_keys or (strict and (report.missing_keys or report.unexpected_keys)):
            raise KeyMismatchError(
                checkpoint=str(ckpt.path),
                missing_keys=report.missing_keys if strict else (),
                unexpected_keys=report.unexpected_keys if strict else (),
                mismatched_keys=report.mismatched_keys,
            )
        report.loaded_keys = load_checkpoint_into(model, ckpt, plan, progress=progress)
    if report.missing_keys or report.unexpected_keys:
        logger.info(
            "loaded %s: %d missing, %d unexpected keys",
            report.checkpoint,
            len(report.missing_keys),
            len(report.unexpected_keys),
        )
    return report
