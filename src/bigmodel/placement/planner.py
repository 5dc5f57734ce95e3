"""The one device planner: the same plan for a model and for the checkpoint saved from it.

Planning runs on a small tree description (:class:`PlanNode`): a node per module (or dotted
name prefix), the tensors directly under it as ``(name, identity, nbytes)`` — tied tensors share
an identity, so they are charged once — its children in order, and whether it may be split.
The tree is built from an ``nn.Module`` (:func:`tree_from_module`) or from a checkpoint's
tensor names alone (:func:`tree_from_checkpoint`), then :func:`plan` places it:

* units are placed in tree order (registration order for a module), starting with the
  children of the root; devices are tried in order (accelerators, ``cpu``, ``disk``; see
  :mod:`bigmodel.foundations.devices`) and each budget is filled: a unit that does not fit
  where earlier units went does not close that device, later units that fit still go there;
* a unit goes whole to the first device if it fits there, else it is split into its children
  and its direct tensors if it may be split; a unit that may not be split (an *atom*: a
  repeated block, a leaf module, a bare tensor) goes to the first device with room for it; an
  atom that fits on no device is recorded as unplaced, and the plan goes on with the next unit;
* ties: atoms that share a tensor (directly or through other atoms) form one tie group, and a
  group lives on one device: the group's every tensor is charged there, once, when its first
  atom is placed, and its other atoms follow to that device at no further cost. A tied tensor
  is therefore never on one device while a module using it is on another (loading and the
  offload hooks would then put it where neither the plan nor the module expects it);
* a device never holds more than its budget: ``Placement.used[d] <= budgets[d]``;
* headroom: when an accelerator runs blocks kept on ``cpu`` or ``disk`` (the *execution
  device*: the first accelerator of the plan, or the one given), those blocks are streamed to
  it, one at a time plus the prefetch window. Room for that is kept there:
  ``Placement.reserved[d]`` is the most the offload hooks hold at once (the largest streamed
  atom; for an entry holding several atoms, its tensors outside repeated blocks, held for the
  entry's forward, plus its largest block) plus the window (``prefetch=True``: one more such
  unit; a size: that bound; ``False``: none), and ``used[d] + reserved[d] <= budgets[d]``.
  Reserving changes what is streamed, so the plan is redone with the reserve until the
  reserve it needs is no more than the one it kept;
* strategies: ``auto``/``sequential`` fill the first device first; ``balanced`` caps each
  accelerator but the last at an even share of the model; ``balanced_low_0`` (accelerate's
  ``get_balanced_memory(low_zero=True)``) balances over the accelerators after the first and
  gives the first only what the others cannot hold, so it stays light for ``generate``'s
  outputs;
* children that all landed on one device are merged back into their parent's entry (``""``
  when the whole tree is on one device); a unit holding no bytes goes where the unit before
  it went, so that it does not split its parent's entry for nothing.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bigmodel.checkpoint.handle import Checkpoint, TensorInfo
from bigmodel.foundations.devices import Device, device_order, is_accelerator
from bigmodel.foundations.types import OffloadOptions
from bigmodel.storage.dtypes import stored_nbytes

__all__ = [
    "STRATEGIES",
    "atoms",
    "device_of",
    "PlanNode",
    "PlanTensor",
    "Placement",
    "Unit",
    "largest_unit",
    "natural_key",
    "plan",
    "repeated_block_classes",
    "tree_from_checkpoint",
    "tree_from_module",
    "tree_from_names",
]

#: ``"auto"`` and ``"sequential"`` fill the first device first; ``"balanced"`` spreads the
#: tree evenly over the accelerators; ``"balanced_low_0"`` spreads it over the accelerators
#: after the first and keeps the first light (accelerate's device_map names).
STRATEGIES = ("auto", "sequential", "balanced", "balanced_low_0")

_NUMERIC = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class PlanTensor:
    """One tensor name: ``identity`` is shared by every name of one tied tensor."""

    name: str
    identity: Hashable
    nbytes: int


@dataclass
class PlanNode:
    """A module, or a dotted prefix of checkpoint names. ``name`` is the full dotted name
    (``""`` for the root); ``tensors`` are the ones directly under it."""

    name: str
    tensors: list[PlanTensor] = field(default_factory=list)
    children: list[PlanNode] = field(default_factory=list)
    splittable: bool = True

    def members(self) -> list[PlanNode]:
        """What the node splits into: its children, then each direct tensor as a unit."""
        leaves = [PlanNode(t.name, [t], [], splittable=False) for t in self.tensors]
        return [*self.children, *leaves]

    def walk(self) -> Iterator[PlanNode]:
        """This node and every node under it, parents before children, in order."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def all_tensors(self) -> Iterator[PlanTensor]:
        for node in self.walk():
            yield from node.tensors

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors under this node, each tied tensor counted once."""
        return _unique_bytes(self.all_tensors(), {})


@dataclass(frozen=True)
class Unit:
    """A placement unit: its name, its bytes (not yet charged elsewhere: for the first atom of a
    tie group, the whole group's) and tensor count."""

    name: str
    nbytes: int
    tensors: int


@dataclass
class Placement:
    """What :func:`plan` decided. ``device_map`` is ``{name: device}`` with children merged
    back into their parents; ``used`` the bytes charged to each device; ``budgets`` the
    budgets planned against (after ``balanced`` shares); ``unplaced`` the units that fit on
    no device, in order; ``reserved`` the bytes kept free on the execution device for the
    blocks streamed to it from ``cpu``/``disk`` (the largest one plus the prefetch window;
    empty when nothing is streamed to an accelerator). The plan fits when nothing is unplaced
    and no device holds more than its budget, its reserve included."""

    device_map: dict[str, Device]
    used: dict[Device, int]
    budgets: dict[Device, int | None]
    unplaced: list[Unit]
    reserved: dict[Device, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.unplaced and not self.over_budget()

    def over_budget(self) -> dict[Device, int]:
        """``{device: bytes used + reserved}`` for every device where that is over budget."""
        need = {d: self.used.get(d, 0) + self.reserved.get(d, 0) for d in self.budgets}
        return {
            d: n
            for d, n in need.items()
            if (limit := self.budgets.get(d)) is not None and n > limit
        }


# -- building trees ------------------------------------------------------------------------


def repeated_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of the elements of ``ModuleList``/``Sequential`` containers whose children are
    all of one class (transformer layers): the natural units that must not be split."""
    classes: set[type[nn.Module]] = set()
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                classes |= kinds
    return classes


def tree_from_module(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    no_split_module_classes: Iterable[type[nn.Module] | str] | None = None,
) -> PlanNode:
    """The plan tree of ``model`` (``meta`` is fine): one node per module, in registration
    order, with its own parameters then buffers (floating-point ones sized at ``dtype``).
    Modules of a class in ``no_split_module_classes`` (default: the classes of repeated
    blocks, :func:`repeated_block_classes`) and modules without children are not split."""
    no_split = {
        c if isinstance(c, str) else c.__name__
        for c in (
            no_split_module_classes
            if no_split_module_classes is not None
            else repeated_block_classes(model)
        )
    }
    root = PlanNode("")
    stack: list[tuple[PlanNode, nn.Module]] = [(root, model)]
    while stack:
        node, module = stack.pop()
        dotted = f"{node.name}." if node.name else ""
        own = [*module._parameters.items(), *module._buffers.items()]
        node.tensors = [
            PlanTensor(dotted + name, id(t), stored_nbytes(t, dtype))
            for name, t in own
            if t is not None
        ]
        for name, child in module.named_children():
            sub = PlanNode(dotted + name, splittable=type(child).__name__ not in no_split)
            node.children.append(sub)
            stack.append((sub, child))
        node.splittable = node.splittable and bool(node.children)
    return root


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key comparing numbers as numbers: ``layers.2`` before ``layers.10``."""
    return [
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    ]


def tree_from_checkpoint(ckpt: Checkpoint, *, dtype: torch.dtype | None = None) -> PlanNode:
    """The plan tree of a checkpoint, from its tensor descriptions alone (no data read).

    Order is the model's as far as names tell: shard by shard (writers fill shards in model
    order), then by name with numbers compared as numbers; aliases of tied tensors come last
    and share the identity of the tensor they alias. See :func:`tree_from_names`.
    """
    infos = {name: ckpt.tensor_info(name) for name in ckpt.keys()}
    shard = {file: i for i, file in enumerate(ckpt.files)}
    stored = sorted(ckpt.stored_keys(), key=lambda k: (shard[infos[k].file], natural_key(k)))
    aliases = sorted(ckpt.aliases, key=natural_key)
    return tree_from_names(
        PlanTensor(name, infos[name].alias_of or name, _info_nbytes(infos[name], dtype))
        for name in [*stored, *aliases]
    )


def _info_nbytes(info: TensorInfo, dtype: torch.dtype | None) -> int:
    cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    return info.numel * cast.itemsize


def tree_from_names(tensors: Iterable[PlanTensor]) -> PlanNode:
    """The plan tree of dotted tensor names, in the order given: every dotted prefix is a
    node. The children of a node whose children are all numeric (``layers.0``, ``layers.1``,
    at least two of them) are repeated blocks and are not split; other nodes with children may
    be."""
    root = PlanNode("")
    nodes = {"": root}
    for tensor in tensors:
        _node_at(nodes, tensor.name.rpartition(".")[0]).tensors.append(tensor)
    for node in nodes.values():
        repeated = len(node.children) >= 2 and all(
            _NUMERIC.fullmatch(child.name.rpartition(".")[2]) for child in node.children
        )
        for child in node.children:
            child.splittable = bool(child.children) and not repeated
    return root


def _node_at(nodes: dict[str, PlanNode], name: str) -> PlanNode:
    missing: list[str] = []
    while name not in nodes:
        missing.append(name)
        name = name.rpartition(".")[0]
    parent = nodes[name]
    for path in reversed(missing):
        child = PlanNode(path)
        parent.children.append(child)
        nodes[path] = child
        parent = child
    return parent


def atoms(tree: PlanNode) -> Iterator[PlanNode]:
    """The units the planner can never split (repeated blocks, leaf modules, bare tensors of
    a split node), in order: what a plan is made of, however it merges them."""
    stack = list(reversed(tree.members()))
    while stack:
        unit = stack.pop()
        if unit.splittable:
            stack.extend(reversed(unit.members()))
        else:
            yield unit


def largest_unit(tree: PlanNode) -> Unit | None:
    """The largest of the :func:`atoms`: the least one device must hold. The first in order
    wins a tie; None if the tree holds nothing."""
    best: Unit | None = None
    for atom in atoms(tree):
        size = atom.nbytes
        if best is None or size > best.nbytes:
            best = Unit(atom.name, size, sum(1 for _ in atom.all_tensors()))
    return best


def device_of(name: str, device_map: Mapping[str, Device]) -> Device | None:
    """The device of ``name`` under a plan's ``device_map``: the entry for it or for its
    nearest dotted ancestor (``""`` covers everything); None if no entry covers it."""
    while name not in device_map:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return device_map[name]


# -- planning ------------------------------------------------------------------------------


def plan(
    tree: PlanNode,
    budgets: Mapping[Device, int | None],
    *,
    strategy: str = "auto",
    prefetch: bool | int | str = True,
    execution: Device | None = None,
    headroom: bool = True,
) -> Placement:
    """Place ``tree`` on ``budgets`` (``{device: bytes or None for unlimited}`` in plan order,
    as :func:`bigmodel.foundations.devices.parse_max_memory` returns) — see the module
    docstring for the rules. ``prefetch`` (as :class:`~bigmodel.OffloadOptions` takes it) and
    ``execution`` (the device offloaded blocks run on; default: the first accelerator of the
    plan, as :func:`bigmodel.placement.device_map.execution_device` picks it) size the
    headroom; ``headroom=False`` plans the budgets as given, for a caller that keeps its own
    room. Never raises for lack of room: see :attr:`Placement.unplaced` and
    :meth:`Placement.over_budget`."""
    planned = _strategy_budgets(tree, budgets, strategy)
    ties = _TieGroups(tree)
    blocks = [(atom, atom.nbytes) for atom in atoms(tree)]
    window = OffloadOptions(prefetch=prefetch).prefetch_bytes
    held: dict[Device, int] = {}
    while True:
        state = _place(tree, ties, {d: _less(b, held.get(d, 0)) for d, b in planned.items()})
        runs = _runs_on(state.placed, execution)
        need = _reserve(tree, blocks, state.placed, window) if headroom and runs else 0
        if runs is None or need <= held.get(runs, 0):
            break
        held[runs] = need  # grows each round, so the rounds end
    reserved = {runs: need} if runs is not None and need else {}
    return Placement(_merge(tree, state.placed), state.used, planned, state.unplaced, reserved)


def _place(tree: PlanNode, ties: _TieGroups, budgets: dict[Device, int | None]) -> _State:
    state = _State(budgets, ties)
    queue = deque(tree.members())
    while queue:
        queue.extendleft(reversed(state.place(queue.popleft())))
    return state


def _less(budget: int | None, reserve: int) -> int | None:
    return None if budget is None else max(0, budget - reserve)


def _runs_on(placed: Mapping[str, Device], execution: Device | None) -> Device | None:
    """The accelerator that runs the streamed blocks, or None when the CPU does."""
    if execution is not None:
        return execution if is_accelerator(execution) else None
    accelerators = sorted({d for d in placed.values() if is_accelerator(d)}, key=device_order)
    return accelerators[0] if accelerators else None


def _reserve(
    tree: PlanNode,
    blocks: list[tuple[PlanNode, int]],
    placed: Mapping[str, Device],
    window: int | None,
) -> int:
    """Room the execution device needs for what is kept on ``cpu``/``disk``, streamed as the
    offload hooks materialise it (:mod:`bigmodel.execution.offload`): each repeated block
    alone, the other tensors of a device-map entry together for the entry's forward, which
    holds them while its blocks come and go. So: the most held at once (an entry's own
    tensors plus its largest block), plus the prefetch window (``None``: the largest unit
    read ahead), never more than the rest of what is streamed."""
    entries = _merge(tree, placed)
    outside: dict[str, list[PlanTensor]] = {}  # entry -> its tensors outside blocks
    inner: dict[str, int] = {}  # entry -> its largest block
    units: list[int] = []
    for atom, size in blocks:
        if device_of(atom.name, placed) not in ("cpu", "disk"):
            continue
        entry = _entry_of(atom.name, entries)
        if atom.children:  # a repeated block (or a module never split): a unit of its own
            inner[entry] = max(inner.get(entry, 0), size)
            units.append(size)
        else:
            outside.setdefault(entry, []).extend(atom.all_tensors())
    own = {entry: _unique_bytes(tensors, {}) for entry, tensors in outside.items()}
    units.extend(own.values())
    held = max((own.get(e, 0) + inner.get(e, 0) for e in own.keys() | inner.keys()), default=0)
    ahead = max(units, default=0) if window is None else window
    return held + min(ahead, sum(units) - held) if held else 0


def _entry_of(name: str, entries: Mapping[str, Device]) -> str:
    while name not in entries and name:
        name = name.rpartition(".")[0]
    return name


def _strategy_budgets(
    tree: PlanNode, budgets: Mapping[Device, int | None], strategy: str
) -> dict[Device, int | None]:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; use {', '.join(map(repr, STRATEGIES))}.")
    out = dict(budgets)
    accelerators = [d for d in out if is_accelerator(d)]
    if strategy == "balanced":
        _balance(out, accelerators, tree.nbytes)
    elif strategy == "balanced_low_0" and len(accelerators) > 1:
        # accelerate's low_zero: the others are balanced as if the first did not exist, and the
        # first keeps only what they cannot hold (its room serves generate's outputs).
        first, rest = accelerators[0], accelerators[1:]
        _balance(out, rest, tree.nbytes)
        others = sum(out[d] or 0 for d in rest)
        out[first] = min(out[first] or 0, max(0, tree.nbytes - others))
    return out


def _balance(out: dict[Device, int | None], accelerators: list[Device], total: int) -> None:
    """Each accelerator but the last takes an even share; the last keeps its whole budget, so
    that whole-block granularity never pushes the tail of the model off the accelerators."""
    if len(accelerators) < 2:
        return
    share = -(-total // len(accelerators))
    for device in accelerators[:-1]:
        limit = out[device]
        out[device] = share if limit is None else min(limit, share)


class _TieGroups:
    """The atoms of a tree grouped by the tensors they share, directly or through other atoms
    (an embedding, the head tied to it, a block reusing its weight): one group, one device.
    ``group[name]`` is the group of the tensor called ``name``; ``tensors[group]`` every tensor
    of the group's atoms, in order."""

    def __init__(self, tree: PlanNode) -> None:
        parent: list[int] = []
        first: dict[Hashable, int] = {}
        held: list[list[PlanTensor]] = []

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for index, atom in enumerate(atoms(tree)):
            parent.append(index)
            held.append(list(atom.all_tensors()))
            for tensor in held[index]:
                a, b = root(index), root(first.setdefault(tensor.identity, index))
                parent[max(a, b)] = min(a, b)
        self.group: dict[str, int] = {}
        self.tensors: dict[int, list[PlanTensor]] = {}
        for index, tensors in enumerate(held):
            group = root(index)
            self.tensors.setdefault(group, []).extend(tensors)
            self.group.update((tensor.name, group) for tensor in tensors)


class _State:
    """The plan so far: where units went, bytes charged, the device of each tie group
    (``None``: its first atom fit nowhere), where each tensor identity lives, and the device
    of the last unit placed (where a unit holding no bytes goes)."""

    def __init__(self, budgets: dict[Device, int | None], ties: _TieGroups) -> None:
        self.budgets = budgets
        self.devices = list(budgets)
        self.ties = ties
        self.used = dict.fromkeys(self.devices, 0)
        self.placed: dict[str, Device] = {}
        self.pinned: dict[int, Device | None] = {}
        self.home: dict[Hashable, Device | None] = {}
        self.unplaced: list[Unit] = []
        # where a unit holding no bytes goes when nothing was placed yet: the first device
        # that can hold anything (not an accelerator kept empty by balanced_low_0 or headroom)
        self.last = next((d for d in self.devices if budgets[d] != 0), None) or (
            self.devices[0] if self.devices else None
        )

    def place(self, unit: PlanNode) -> list[PlanNode]:
        """Place ``unit`` (or record it as unplaced); return its members if it must be split.

        A unit goes whole only where each of its atoms would go on its own: on the first
        device, if it fits there with the rest of its tie groups; otherwise it is split, and
        an atom goes to the first device with room for its tie group, or to its group's device
        once the group is placed."""
        tensors = list(unit.all_tensors())
        groups = list(dict.fromkeys(self.ties.group[t.name] for t in tensors))
        pins = {self.pinned[g] for g in groups if g in self.pinned}
        if pins and not unit.splittable:  # an atom whose group is placed, or fit nowhere
            return self._settle(unit, tensors, groups, pins.pop())
        fresh = [t for g in groups if g not in self.pinned for t in self.ties.tensors[g]]
        need = _unique_bytes(fresh, self.home)
        if need == 0 and not pins:
            return self._settle(unit, tensors, groups, self.last)
        if unit.splittable:
            first = self.devices[0] if self.devices else None
            whole = first is not None and pins <= {first} and self._fits(first, need)
            return self._settle(unit, tensors, groups, first) if whole else unit.members()
        target = next((d for d in self.devices if self._fits(d, need)), None)
        return self._settle(unit, tensors, groups, target, need)

    def _fits(self, device: Device, need: int) -> bool:
        limit = self.budgets[device]
        return limit is None or self.used[device] + need <= limit

    def _settle(
        self,
        unit: PlanNode,
        tensors: list[PlanTensor],
        groups: list[int],
        device: Device | None,
        need: int = 0,
    ) -> list[PlanNode]:
        """Put ``unit`` on ``device`` (None: record it as unplaced, needing ``need`` bytes),
        with the tie groups it opens: their every tensor is charged there now, once."""
        if device is None:
            self.unplaced.append(Unit(unit.name, need, len(tensors)))
        else:
            self.placed[unit.name] = device
            self.last = device
        for group in groups:
            if group in self.pinned:
                continue
            self.pinned[group] = device
            for tensor in self.ties.tensors[group]:
                if tensor.identity not in self.home:
                    self.home[tensor.identity] = device
                    if device is not None:
                        self.used[device] += tensor.nbytes
        return []


def _unique_bytes(tensors: Iterable[PlanTensor], charged: Mapping[Hashable, object]) -> int:
    """Bytes of ``tensors`` not yet in ``charged``, each identity counted once."""
    seen: set[Hashable] = set()
    total = 0
    for tensor in tensors:
        if tensor.identity not in charged and tensor.identity not in seen:
            seen.add(tensor.identity)
            total += tensor.nbytes
    return total


def _merge(tree: PlanNode, placed: Mapping[str, Device]) -> dict[str, Device]:
    """``placed`` with every node whose members all landed on one device collapsed into one
    entry for the node, in tree order (``{"": device}`` when everything is on one device)."""
    whole: dict[str, Device] = {}
    for node in reversed(list(tree.walk())):
        if node is not tree and node.name in placed:
            whole[node.name] = placed[node.name]
            continue
        devices = {whole.get(c.name) for c in node.children}
        devices |= {placed.get(t.name) for t in node.tensors}
        only = next(iter(devices)) if len(devices) == 1 else None
        if only is not None:
            whole[node.name] = only
    out: dict[str, Device] = {}
    stack: list[PlanNode | PlanTensor] = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, PlanTensor):
            if item.name in placed:
                out[item.name] = placed[item.name]
        elif item.name in whole:
            out[item.name] = whole[item.name]
        else:
            stack.extend(reversed([*item.children, *item.tensors]))
    return out
