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
from collections.abc import Callable, Iterable, Mapping
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

    def build_region(
        self,
        region: tuple[slice, ...],
        shapes: Mapping[str, list[tuple[int, ...]]],
        read: Callable[[str, tuple[slice, ...]], torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """``region`` of this group's single target, reading only the parts of the checkpoint
        tensors it covers (``read(key, index)``; ``shapes``: each pattern's source shapes) — a
        rank that owns experts 0-7 reads only those. None for chains other than stacking
        (and concatenating) experts."""
        layout = _fused_layout(self.converter, shapes)
        if layout is None:
            return None
        keys: dict[str, list[str]] = {}
        for pattern, key in self.sources:
            keys.setdefault(pattern, []).append(key)
        return _fill(
            layout, region, lambda p, i, index: read(keys[p][i], index), dtype, torch.device("cpu")
        )

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
        layout = _fused_layout(
            self.converter, {p: [x.shape for x in ts] for p, ts in tensors.items()}
        )
        if layout is not None:
            first = tensors[layout.patterns[0]][0]
            whole = tuple(slice(0, n) for n in layout.shape)
            fused = _fill(
                layout,
                whole,
                lambda p, i, index: tensors[p][i][index],
                dtype or first.dtype,
                first.device,
            )
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


@dataclass(frozen=True)
class _Fused:
    """Where each source lands in the result of ``MergeModulelist(dim=0)`` (then
    ``Concatenate(dim)`` of the stacks, in source-pattern order): source ``i`` of pattern ``k``
    is index ``i`` of dim 0 (``k * count + i`` when the stacks are concatenated along dim 0)
    and, along ``dim``, the block starting at ``k * width``."""

    dim: int
    patterns: list[str]
    count: int
    source_shape: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.count if self.dim == 0 else self.source_shape[self.dim - 1]

    @property
    def shape(self) -> list[int]:
        shape = [self.count, *self.source_shape]
        shape[self.dim] = self.width * len(self.patterns)
        return shape


def _fused_layout(converter: Any, shapes: Mapping[str, list[tuple[int, ...]]]) -> _Fused | None:
    """The layout of a stack (and concatenate) chain over sources of these shapes, or None
    for any other chain (which then runs transformers' operations as they are)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    merge_only = ops == [("MergeModulelist", 0)]
    merge_cat = len(ops) == 2 and ops[0] == ("MergeModulelist", 0) and ops[1][0] == "Concatenate"
    patterns = [p for p in converter.source_patterns if p in shapes]
    if len(converter.target_patterns) != 1 or not (merge_only or merge_cat) or not patterns:
        return None
    if merge_only and len(patterns) != 1:
        return None
    first, count = shapes[patterns[0]][0], len(shapes[patterns[0]])
    if any(len(shapes[p]) != count or any(s != first for s in shapes[p]) for p in patterns):
        return None
    dim = 0 if merge_only else int(ops[1][1] or 0)
    dim = dim + len(first) + 1 if dim < 0 else dim
    return _Fused(dim, patterns, count, tuple(first))


def _fill(
    layout: _Fused,
    region: tuple[slice, ...],
    read: Callable[[str, int, tuple[slice, ...]], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``region`` of the fused result, reading only the parts of the sources it covers:
    ``read(pattern, i, index)`` gives that part of source ``i`` of ``pattern``."""
    out = torch.empty([r.stop - r.start for r in region], dtype=dtype, device=device)
    d, rows = layout.dim, region[0]
    for k, pattern in enumerate(layout.patterns):
        for i in range(layout.count):
            row = k * layout.count + i if d == 0 else i
            if not rows.start <= row < rows.stop:
                continue
            src, dst = list(region[1:]), [slice(0, r.stop - r.start) for r in region[1:]]
            if d > 0:
                lo = max(region[d].start, k * layout.width)
                hi = min(region[d].stop, (k + 1) * layout.width)
                if lo >= hi:
                    continue
                src[d - 1] = slice(lo - k * layout.width, hi - k * layout.width)
                dst[d - 1] = slice(lo - region[d].start, hi - region[d].start)
            out[row - rows.start][tuple(dst)].copy_(read(pattern, i, tuple(src)))
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
