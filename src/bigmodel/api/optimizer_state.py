"""Optimizer state keyed by parameter names, as ``torch.distributed.checkpoint.state_dict`` keys it.

``optimizer.state_dict()`` numbers parameters in the order of its param groups, which
depends on how the optimizer was built; names survive a rebuild, a change of world size, or
a reordered parameter list. :func:`named_optimizer_state` gives the state as
``{"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}`` (the
structure ``get_optimizer_state_dict`` returns), split into tensors (for a safetensors file)
and a JSON document that refers to them; :func:`load_named_optimizer_state` reverses it.
Unlike ``get_optimizer_state_dict``, an optimizer that has not stepped yet is saved as it is
(no initialising step is run). Under FSDP2 the state tensors are DTensors; the manager saves
them whole (gathered to one rank), and loading gives each rank only its slice
(:func:`_placed`), so a checkpoint restores at any world size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.execution.distributed import local_shard, mesh_device
from bigmodel.foundations.errors import InvalidCheckpointError
from bigmodel.foundations.tensors import is_dtensor

__all__ = ["load_named_optimizer_state", "named_optimizer_state"]


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in ``state_dict()`` index order."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names: list[str] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = by_id.get(id(param))
            if name is None:
                raise ValueError(
                    f"The optimizer holds a parameter of shape {list(param.shape)} that is not a "
                    "parameter of the model. Fix: pass the model whose parameters the optimizer updates."
                )
            names.append(name)
    return names


def _json_value(value: Any, where: str) -> Any:
    """``value`` as JSON (tuples become lists); anything else is refused with its place."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"Optimizer state {where} is a {type(value).__name__}, which cannot be saved as JSON. "
            "Fix: keep only tensors, numbers, strings, booleans, lists and dicts in optimizer state."
        ) from exc


def named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by file key, the JSON document). Tensors are the optimizer's own (not copies)."""
    names = _param_names(model, optimizer)
    raw = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, entry in raw["state"].items():
        name = names[index]
        state[name] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                file_key = f"state.{name}.{key}"
                tensors[file_key] = value.detach()
                state[name][key] = {"tensor": file_key}
            else:
                state[name][key] = {"value": _json_value(value, f"{name}.{key}")}
    groups = []
    for i, group in enumerate(raw["param_groups"]):
        plain = {k: _json_value(v, f"param_groups[{i}].{k}") for k, v in group.items()}
        plain["params"] = [names[index] for index in group["params"]]
        groups.append(plain)
    return tensors, {"state": state, "param_groups": groups}


def _mismatch(path: str, message: str) -> InvalidCheckpointError:
    return InvalidCheckpointError.one(
        path,
        "optimizer-mismatch",
        message,
        hint="restore into an optimizer built like the saved one (same parameter groups), "
        "or restore the model alone (optimizer=None)",
    )


def load_named_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    document: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    path: str,
) -> None:
    """Load the state :func:`named_optimizer_state` saved into ``optimizer`` (by name)."""
    names = _param_names(model, optimizer)
    saved_groups = document.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(optimizer.param_groups):
        raise _mismatch(path, "the saved optimizer has a different number of parameter groups")
    index = {name: i for i, name in enumerate(names)}
    groups = []
    offset = 0
    for i, (saved, live) in enumerate(zip(saved_groups, optimizer.param_groups, strict=True)):
        live_names = names[offset : offset + len(live["params"])]
        offset += len(live_names)
        if sorted(saved.get("params", [])) != sorted(live_names):
            raise _mismatch(path, f"parameter group {i} holds other parameters than the saved one")
        groups.append({**saved, "params": [index[n] for n in live_names]})
    params = dict(model.named_parameters())
    state: dict[int, dict[str, Any]] = {}
    for name, entry in document.get("state", {}).items():
        if name not in index:
            raise _mismatch(path, f"the saved state names {name!r}, not a parameter here")
        state[index[name]] = {
            key: _placed(tensors[v["tensor"]], params[name]) if "tensor" in v else v["value"]
            for key, v in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _placed(saved: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A private copy of ``saved`` laid out like ``param``: for a DTensor parameter (FSDP2)
    and a state tensor of its shape (``exp_avg``), only this rank's slice, as a DTensor of the
    parameter's placements; anything else (``step``, plain parameters) whole."""
    if is_dtensor(param) and not is_dtensor(saved) and tuple(saved.shape) == tuple(param.shape):
        local, _ = local_shard(
            lambda index: saved[index].clone(),
            param,
            dtype=saved.dtype,
            device=mesh_device(param),
        )
        return local
    return saved.clone()
