"""What a load will read, decided from headers alone: key matching, shapes, tied names.

:func:`plan_load` pairs every module tensor with the checkpoint key that fills it (after
``key_mapping`` and whole-model prefix detection, see :mod:`bigmodel.placement.keys`), groups
names that share one tensor object (tied weights are read once), and checks shapes. A load
that the options forbid (strict with missing/unexpected keys; a shape mismatch without
``ignore_mismatched_sizes``) raises :class:`~bigmodel.KeyMismatchError` here, before any
weight is touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.foundations.errors import KeyMismatchError
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import LoadReport, MismatchedKey
from bigmodel.placement.conversions import Conversions, DerivedGroup
from bigmodel.placement.keys import KeyPlan, key_plan, match_keys

__all__ = [
    "IgnoreRules",
    "LoadPlan",
    "MatchRules",
    "Plan",
    "ignore_rules",
    "plan_load",
    "tie_groups",
]

Plan = list[tuple[str, list[str]]]  # (checkpoint key, module names sharing one tensor)


@dataclass(frozen=True)
class IgnoreRules:
    """Keys a model says a checkpoint may have or lack: legacy buffers, declared patterns."""

    #: Non-persistent buffers of the model: a checkpoint key naming one is a legacy key (the
    #: buffer used to be saved; the model now computes it).
    buffers: frozenset[str] = frozenset()
    unexpected: re.Pattern[str] | None = None
    missing: re.Pattern[str] | None = None

    def unexpected_reason(self, checkpoint_key: str, module_key: str) -> str | None:
        if module_key in self.buffers:
            return "names a non-persistent buffer of the model (the model computes it)"
        if self.unexpected is not None and self.unexpected.search(checkpoint_key):
            return "matches the model's _keys_to_ignore_on_load_unexpected"
        return None

    def missing_reason(self, module_key: str) -> str | None:
        if self.missing is not None and self.missing.search(module_key):
            return "matches the model's _keys_to_ignore_on_load_missing (initialised)"
        return None


def _alternation(patterns: Iterable[str]) -> re.Pattern[str] | None:
    patterns = sorted(set(patterns))
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def ignore_rules(model: nn.Module) -> IgnoreRules:
    """What ``model`` declares ignorable, read from the instance (no import of transformers):
    its non-persistent buffers, and the ``_keys_to_ignore_on_load_unexpected`` /
    ``_keys_to_ignore_on_load_missing`` regex patterns transformers models carry. Like
    transformers, a model with a ``position_ids`` or ``rotary_emb.inv_freq`` buffer also
    ignores those keys where older checkpoints kept them."""
    buffers = frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    )
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    names = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in names):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in names):
        unexpected.add(r"(^|\.)position_ids$")
    missing = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    return IgnoreRules(buffers, _alternation(unexpected), _alternation(missing))


@dataclass(frozen=True)
class MatchRules:
    """How checkpoint keys are matched to module names, and what a mismatch means."""

    strict: bool = True
    key_mapping: Mapping[str, str] | None = None
    detect_prefix: bool = True
    ignore_mismatched_sizes: bool = False
    #: Only loads that replace tensors can re-initialise a mis-shaped one (for the error's hint).
    can_ignore_mismatched: bool = True
    ignore: IgnoreRules = IgnoreRules()
    #: The model's own layout conversions (a transformers model), applied instead of
    #: ``key_mapping`` and prefix detection; see :mod:`bigmodel.placement.conversions`.
    conversions: Conversions | None = None


@dataclass
class LoadPlan:
    """What to read (in file order), what to initialise, and the report so far."""

    items: Plan
    to_init: list[list[str]]
    report: LoadReport
    #: Module tensors built from several checkpoint tensors by the model's conversions.
    derived: list[DerivedGroup] = field(default_factory=list)


def tie_groups(targets: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of the module's state grouped by tensor object (a tied weight appears under several)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _pair(
    ckpt: Checkpoint,
    targets: Mapping[str, torch.Tensor],
    from_model: Mapping[str, str],
    report: LoadReport,
    built: frozenset[str] = frozenset(),
) -> tuple[Plan, list[list[str]]]:
    """For each tie group, the checkpoint key that fills it, or the group to initialise
    (groups that conversions build, ``built``, are neither)."""
    items: Plan = []
    to_init: list[list[str]] = []
    for group in tie_groups(targets):
        if any(name in built for name in group):
            continue
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
            items.append((source, group))
        else:
            if not mismatched:
                report.missing_keys.extend(group)
            to_init.append(group)
    return items, to_init


def _set_aside_ignored(
    report: LoadReport, to_model: Mapping[str, str], ignore: IgnoreRules
) -> None:
    """Move the keys the model says may be missing or unexpected into ``ignored_keys``."""
    unexpected = []
    for key in report.unexpected_keys:
        reason = ignore.unexpected_reason(key, to_model.get(key, key))
        if reason is None:
            unexpected.append(key)
        else:
            report.ignored_keys[key] = reason
    missing = []
    for key in report.missing_keys:
        reason = ignore.missing_reason(key)
        if reason is None:
            missing.append(key)
        else:
            report.ignored_keys[key] = reason
    report.unexpected_keys, report.missing_keys = unexpected, missing
    if report.ignored_keys:
        logger.info(
            "%s: %d key(s) ignored as the model allows: %s",
            report.checkpoint,
            len(report.ignored_keys),
            ", ".join(f"{k} ({why})" for k, why in list(report.ignored_keys.items())[:10]),
        )


def _enforce(ckpt: Checkpoint, report: LoadReport, rules: MatchRules) -> None:
    # Like torch's load_state_dict, a shape mismatch is an error even when strict=False.
    bad_shapes = bool(report.mismatched_keys) and not rules.ignore_mismatched_sizes
    if bad_shapes or (rules.strict and (report.missing_keys or report.unexpected_keys)):
        raise KeyMismatchError(
            checkpoint=str(ckpt.path),
            missing_keys=report.missing_keys if rules.strict else (),
            unexpected_keys=report.unexpected_keys if rules.strict else (),
            mismatched=report.mismatched_keys if bad_shapes else (),
            can_ignore_mismatched=rules.can_ignore_mismatched,
        )


def _match(
    ckpt: Checkpoint, targets: Mapping[str, torch.Tensor], rules: MatchRules
) -> tuple[KeyPlan, list[DerivedGroup]]:
    if rules.conversions is not None:
        to_model, groups = rules.conversions.apply(ckpt.keys(), targets)
        return key_plan(to_model), groups
    keys = match_keys(
        ckpt.keys(), targets, key_mapping=rules.key_mapping, detect_prefix=rules.detect_prefix
    )
    return keys, []


def _check_derived(
    ckpt: Checkpoint,
    targets: Mapping[str, torch.Tensor],
    groups: list[DerivedGroup],
    report: LoadReport,
) -> None:
    """The shapes conversions will build (run on ``meta`` tensors: no data is read), against
    the model's; a group building no tensor of the model is unexpected."""
    for group in groups:
        sources = [key for _, key in group.sources]
        meta: dict[str, list[torch.Tensor]] = {}
        for pattern, key in group.sources:
            info = ckpt.tensor_info(key)
            meta.setdefault(pattern, []).append(
                torch.empty(info.shape, dtype=info.dtype, device="meta")
            )
        shapes = {name: tuple(t.shape) for name, t in group.build(meta, None).items()}
        if not any(name in targets for name in shapes):
            report.unexpected_keys.extend(sources)
            continue
        for name, shape in shapes.items():
            if name in targets and shape != tuple(targets[name].shape):
                report.mismatched_keys.append(
                    MismatchedKey(name, shape, tuple(targets[name].shape))
                )
            elif name in targets:
                report.converted_keys[name] = sources


def plan_load(ckpt: Checkpoint, targets: Mapping[str, torch.Tensor], rules: MatchRules) -> LoadPlan:
    """Match keys and shapes from the headers alone; raise before anything is loaded."""
    keys, groups = _match(ckpt, targets, rules)
    from_model = {m: c for c, m in keys.to_model.items()}
    report = LoadReport(checkpoint=str(ckpt.path), renamed_keys=keys.renamed, prefix=keys.prefix)
    if keys.prefix:
        logger.info("checkpoint %s: %s to match the model's key names", ckpt.path, keys.prefix)
    built = frozenset(name for group in groups for name in group.targets())
    items, to_init = _pair(ckpt, targets, from_model, report, built)
    _check_derived(ckpt, targets, groups, report)
    report.unexpected_keys += [c for c, m in keys.to_model.items() if m not in targets]
    _set_aside_ignored(report, keys.to_model, rules.ignore)
    _enforce(ckpt, report, rules)
    order = {file: i for i, file in enumerate(ckpt.files)}
    items.sort(key=lambda item: order[ckpt.tensor_info(item[0]).file])
    return LoadPlan(items=items, to_init=to_init, report=report, derived=groups)
