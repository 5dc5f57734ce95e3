"""Checkpoint layouts a model converts at load time: transformers' key renamings and fusions.

transformers 5 models load checkpoints in their original layout (what ``save_pretrained``
writes by default and what the Hub holds) through a list of transforms: renamings
(``embed_out`` -> ``lm_head``), and converters that build one tensor from several (MoE
experts ``experts.{i}.w1/w3`` stacked and concatenated into ``experts.gate_up_proj``) or
several from one. bigmodel takes that list from transformers itself
(``transformers.conversion_mapping.get_model_conversion_mapping``), matches keys with
transformers' own ``rename_source_key`` and runs the converters' own operations, inside its
plan: each target tensor is built from its sources straight into its final place, one group
at a time. Nothing here imports transformers unless the model is a transformers model.

:func:`model_conversions` returns None for any other model, and for a checkpoint whose keys
need no conversion (the plan then matches keys as usual).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Conversions", "DerivedGroup", "model_conversions"]


@dataclass
class DerivedGroup:
    """Module tensors built together from checkpoint tensors by one converter."""

    converter: Any  # a transformers WeightConverter (its patterns and operations)
    layer: str  # the renamed key that names the group (transformers' layer name)
    #: (converter source pattern, checkpoint key), in checkpoint natural order
    sources: list[tuple[str, str]] = field(default_factory=list)

    def targets(self) -> list[str]:
        """The module names this group builds (known before any tensor is read)."""
        patterns: list[str] = list(self.converter.target_patterns)
        for pattern in patterns:
            if pattern in self.layer:
                prefix, _, suffix = self.layer.partition(pattern)
                return [prefix + t + suffix for t in patterns]
        return [self.layer]

    def build(
        self,
        tensors: Mapping[str, list[torch.Tensor]],
        model: nn.Module | None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the converter's operations on ``tensors`` ({source pattern: tensors in
        checkpoint order}), cast to ``dtype`` first as transformers casts them; return
        {module name: tensor}. Stacking experts (and concatenating two stacks) writes each
        source once into the result, cast on the way, instead of a copy per operation."""
        fused = _stack_and_concatenate(self.converter, tensors, dtype)
        if fused is not None:
            return {self.targets()[0]: fused}
        collected: dict[str, Any] = {
            p: [t if dtype is None else t.to(dtype) for t in ts] for p, ts in tensors.items()
        }
        converter = self.converter
        for op in converter.operations:
            collected = op.convert(
                collected,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=self.layer,
                model=model,
                config=getattr(model, "config", None),
                missing_keys=None,
            )
        names = dict(zip(converter.target_patterns, self.targets(), strict=False))
        return {names.get(k, k): v for k, v in collected.items()}


def _stack_and_concatenate(
    converter: Any, tensors: Mapping[str, list[torch.Tensor]], dtype: torch.dtype | None
) -> torch.Tensor | None:
    """The result of ``MergeModulelist(dim=0)`` (then ``Concatenate(dim=d)`` of the stacks, in
    source-pattern order) built in one allocation, or None for any other operation chain.

    Equal to running the two operations: ``stack`` puts source ``i`` at index ``i`` of dim 0,
    and ``cat`` of the stacks along ``d`` puts stack ``k`` at offset ``k * width`` along ``d``.
    """
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    merge_only = ops == [("MergeModulelist", 0)]
    merge_cat = len(ops) == 2 and ops[0] == ("MergeModulelist", 0) and ops[1][0] == "Concatenate"
    stacks = [tensors[p] for p in converter.source_patterns if p in tensors]
    if len(converter.target_patterns) != 1 or not (merge_only or merge_cat) or not stacks:
        return None
    if merge_only and len(stacks) != 1:
        return None
    first, count = stacks[0][0], len(stacks[0])
    if any(len(s) != count or any(x.shape != first.shape for x in s) for s in stacks):
        return None
    dim = 0 if merge_only else int(ops[1][1] or 0)
    dim = dim + first.dim() + 1 if dim < 0 else dim
    width = count if dim == 0 else first.shape[dim - 1]
    shape = [count, *first.shape]
    shape[dim] = width * len(stacks)
    out = torch.empty(shape, dtype=dtype or first.dtype, device=first.device)
    for k, stack in enumerate(stacks):
        part = out.narrow(dim, k * width, width)
        for i, tensor in enumerate(stack):
            part[i].copy_(tensor)
    return out


def _natural(key: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]


@dataclass
class Conversions:
    """The transforms of one transformers model, applied to one checkpoint's keys."""

    renamings: list[Any]
    converters: list[Any]
    base_model_prefix: str | None

    def apply(
        self, checkpoint_keys: Iterable[str], targets: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, str], list[DerivedGroup]]:
        """Checkpoint key -> module key for keys only renamed, and the converter groups."""
        from transformers.core_model_loading import rename_source_key

        by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        to_model: dict[str, str] = {}
        groups: dict[str, DerivedGroup] = {}
        for key in sorted(checkpoint_keys, key=_natural):
            renamed, pattern = rename_source_key(
                key, self.renamings, self.converters, self.base_model_prefix, dict(targets)
            )
            if renamed not in targets and key in targets:
                renamed, pattern = key, None  # as transformers: the key was right as it was
            if pattern is None:
                to_model[key] = renamed
                continue
            group = groups.get(renamed)
            if group is None:
                group = groups[renamed] = DerivedGroup(copy.deepcopy(by_pattern[pattern]), renamed)
            group.sources.append((pattern, key))
        return to_model, list(groups.values())


def model_conversions(
    model: nn.Module, checkpoint_keys: Iterable[str], key_mapping: Mapping[str, str] | None
) -> Conversions | None:
    """The conversions ``model`` (a transformers model) applies to these checkpoint keys, or
    None when it is not a transformers model or no key needs converting or renaming."""
    if "transformers" not in sys.modules:
        return None  # nobody imported it: the model cannot be one of its classes
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    if not isinstance(model, PreTrainedModel):
        return None
    mapping = get_model_conversion_mapping(model, key_mapping=dict(key_mapping or {}) or None)
    conversions = Conversions(
        renamings=[t for t in mapping if isinstance(t, WeightRenaming)],
        converters=[t for t in mapping if isinstance(t, WeightConverter)],
        base_model_prefix=getattr(model, "base_model_prefix", None) or None,
    )
    # Used only when the model's transforms change some key: a checkpoint that only needs
    # its whole-model prefix added or removed takes bigmodel's usual (reported) prefix path.
    keys = list(checkpoint_keys)
    bare = dataclasses.replace(conversions, base_model_prefix=None)
    to_model, groups = bare.apply(keys, model.state_dict(keep_vars=True))
    if not groups and all(to_model[k] == k for k in keys):
        return None
    return conversions
