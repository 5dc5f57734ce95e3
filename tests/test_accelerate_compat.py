"""bigmodel.accelerate against accelerate itself: the same device maps (accelerator indexes as
integers) but for the room accelerate keeps on ``cpu`` for ``disk`` blocks (bigmodel keeps
none: compared with accelerate given that room back), the same outputs, the same return
shapes, on small pure-torch models; and each documented difference shown where it is one."""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import nn

import bigmodel
import bigmodel.accelerate as bma

accelerate = pytest.importorskip("accelerate")
accelerate_utils = pytest.importorskip("accelerate.utils")
accelerate_hooks = pytest.importorskip("accelerate.hooks")
accelerate_modeling = pytest.importorskip("accelerate.utils.modeling")

HIDDEN = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.fc(x))) + x


class Net(nn.Module):
    """Embedding, repeated blocks, a head at least as large as a block, a buffer per block."""

    def __init__(self, layers: int = 6, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, HIDDEN)
        self.blocks = nn.ModuleList([Block() for _ in range(layers)])
        self.head = nn.Linear(HIDDEN, 50, bias=False)
        for block in self.blocks:
            block.register_buffer("gain", torch.full((HIDDEN,), 1.5))
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x) * block.gain
        return self.head(x)


def _net(seed: int = 0, **kwargs: object) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)  # type: ignore[arg-type]


def _mlp(layers: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(layers)])


IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
BLOCK = HIDDEN * HIDDEN * 4 + HIDDEN * 4 * 4  # fc + bias + norm (2) + gain


def _quiet(fn: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# -- construction ------------------------------------------------------------------------------


def test_init_empty_weights_leaves_the_same_tensors_on_meta_as_accelerate():
    with bma.init_empty_weights():
        ours = Net()
    with accelerate.init_empty_weights():
        theirs = Net()
    assert {n: t.device.type for n, t in ours.state_dict().items()} == {
        n: t.device.type for n, t in theirs.state_dict().items()
    }
    assert ours.embed.weight.is_meta and not ours.blocks[0].gain.is_meta


def test_init_empty_weights_reads_accelerates_environment_flag_for_buffers(monkeypatch):
    monkeypatch.setenv("ACCELERATE_INIT_INCLUDE_BUFFERS", "1")
    with bma.init_empty_weights():
        ours = Net()
    with accelerate.init_empty_weights():
        theirs = Net()
    assert ours.blocks[0].gain.is_meta and theirs.blocks[0].gain.is_meta


def test_init_on_device_puts_parameters_where_accelerate_does():
    with bma.init_on_device(torch.device("meta")):
        ours = nn.Linear(4, 4)
    with accelerate.init_on_device(torch.device("meta")):
        theirs = nn.Linear(4, 4)
    assert ours.weight.device == theirs.weight.device == torch.device("meta")
    assert isinstance(ours.weight, nn.Parameter)


# -- sizes and plans ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float16", torch.bfloat16])
def test_compute_module_sizes_equals_accelerates_for_a_downcast_or_none(dtype):
    model = _net(tie=True)
    ours = bma.compute_module_sizes(model, dtype=dtype, special_dtypes={"head.weight": "float32"})
    theirs = accelerate_utils.compute_module_sizes(
        model, dtype=dtype, special_dtypes={"head.weight": "float32"}
    )
    assert isinstance(ours, dict) and ours["missing"] == 0  # a defaultdict(int), as accelerate's
    del ours["missing"]
    assert dict(ours) == dict(theirs)
    assert dict(bma.compute_module_sizes(model, buffers_only=True)) == dict(
        accelerate_utils.compute_module_sizes(model, buffers_only=True)
    )


def test_compute_module_sizes_sizes_an_upcast_at_the_dtype_the_load_produces():
    model = _mlp(1).to(torch.float16)
    assert (
        bma.compute_module_sizes(model, dtype=torch.float32)[""] == (HIDDEN * HIDDEN + HIDDEN) * 4
    )
    # accelerate keeps the smaller of the two, though its loader casts to float32
    assert accelerate_utils.compute_module_sizes(model, dtype=torch.float32)[""] == (
        (HIDDEN * HIDDEN + HIDDEN) * 2
    )


LINEAR = (HIDDEN * HIDDEN + HIDDEN) * 4
EMBED = 50 * HIDDEN * 4  # Net's largest layers: embed, head


def _with_cpu_room(max_memory: dict, room: int) -> dict:
    """``max_memory`` with the room accelerate keeps on ``cpu`` for the largest layer added
    back: bigmodel keeps none there (``disk`` blocks are read from the file mapping, outside
    the CPU budget), so its maps are accelerate's maps for these budgets."""
    return {**max_memory, "cpu": max_memory["cpu"] + room}


def test_infer_auto_device_map_keeps_no_cpu_room_for_disk_blocks_where_accelerate_keeps_one():
    model = _mlp()
    max_memory = {"cpu": 3 * LINEAR + 10, "disk": None}
    ours = bma.infer_auto_device_map(model, max_memory=dict(max_memory))
    theirs = accelerate_utils.infer_auto_device_map(model, max_memory=dict(max_memory))
    assert [ours[str(i)] for i in range(8)].count("cpu") == 3  # the whole budget, kept
    assert list(theirs.values()).count("cpu") == 2  # one layer's room left on the cpu
    assert dict(ours) == dict(
        accelerate_utils.infer_auto_device_map(model, max_memory=_with_cpu_room(max_memory, LINEAR))
    )


@pytest.mark.parametrize(
    "max_memory",
    [
        {"cpu": 3 * LINEAR + 10, "disk": None},
        {"cpu": 5 * LINEAR},  # no disk named: accelerate plans it last anyway
        {0: 2 * LINEAR + 10, 1: 3 * LINEAR, "cpu": 10 * LINEAR},
        {0: 2 * LINEAR, "cpu": 2 * LINEAR + 10, "disk": None},
    ],
)
def test_infer_auto_device_map_splitting_anything_equals_accelerates_map_but_its_cpu_room(
    max_memory,
):
    model = _mlp()
    theirs = accelerate_utils.infer_auto_device_map(
        model, max_memory=_with_cpu_room(max_memory, LINEAR)
    )
    ours = _quiet(lambda: bma.infer_auto_device_map(model, max_memory=dict(max_memory)))
    assert isinstance(ours, OrderedDict)
    assert dict(ours) == dict(theirs)
    assert {type(v) for v in ours.values() if v not in ("cpu", "disk")} <= {int}


@pytest.mark.parametrize(
    "max_memory",
    [
        {"cpu": 3 * BLOCK + 6400, "disk": None},
        {0: 2 * BLOCK + 6400, 1: 2 * BLOCK, "cpu": 4 * BLOCK + 6400, "disk": None},
        {0: 4 * BLOCK, "cpu": 20 * BLOCK},
    ],
)
def test_infer_auto_device_map_with_no_split_blocks_equals_accelerates_map_but_its_cpu_room(
    max_memory,
):
    model = _net()
    kwargs = {"no_split_module_classes": ["Block"]}
    theirs = accelerate_utils.infer_auto_device_map(
        model, max_memory=_with_cpu_room(max_memory, EMBED), **kwargs
    )
    ours = _quiet(lambda: bma.infer_auto_device_map(model, max_memory=dict(max_memory), **kwargs))
    assert dict(ours) == dict(theirs)


def test_infer_auto_device_map_keeps_tied_modules_on_one_device_as_accelerate_does():
    model = _net(tie=True)
    kwargs = {"max_memory": {"cpu": 4 * BLOCK, "disk": None}, "no_split_module_classes": ["Block"]}
    theirs = accelerate_utils.infer_auto_device_map(model, **kwargs)
    ours = bma.infer_auto_device_map(model, **kwargs)
    assert ours["embed"] == ours["head"]
    assert theirs["embed"] == theirs["head"]


def test_infer_auto_device_map_sizes_special_dtypes_as_accelerate_does():
    model = _mlp()
    max_memory = {"cpu": 3 * LINEAR, "disk": None}
    kwargs = {
        "dtype": torch.float16,
        "special_dtypes": {f"{i}.weight": torch.float32 for i in range(8)},
    }
    layer = HIDDEN * HIDDEN * 4 + HIDDEN * 2  # a float32 weight and a float16 bias
    assert dict(bma.infer_auto_device_map(model, max_memory=max_memory, **kwargs)) == dict(
        accelerate_utils.infer_auto_device_map(
            model, max_memory=_with_cpu_room(max_memory, layer), **kwargs
        )
    )


def test_infer_auto_device_map_fills_a_device_that_accelerate_leaves_half_empty():
    model = _net()  # a block's norm still fits on the cpu after its fc did not
    max_memory = {"cpu": 2 * BLOCK + EMBED + 300, "disk": None}
    ours = bma.infer_auto_device_map(model, max_memory=dict(max_memory))
    theirs = accelerate_utils.infer_auto_device_map(
        model, max_memory=_with_cpu_room(max_memory, EMBED)
    )
    assert dict(ours) != dict(theirs)
    assert ours["blocks.2.norm"] == "cpu" and ours["blocks.2.fc"] == "disk"
    assert theirs["blocks.2"] == "disk"
    # with fallback_allocation, accelerate fills too; the answer is bigmodel's either way
    kwargs = {"max_memory": dict(max_memory), "fallback_allocation": True}
    assert bma.infer_auto_device_map(model, **kwargs) == ours


def test_infer_auto_device_map_warns_the_bytes_sent_to_a_disk_max_memory_did_not_name():
    with pytest.warns(UserWarning, match="names no 'disk'"):
        plan = bma.infer_auto_device_map(_mlp(), max_memory={"cpu": 4 * LINEAR})
    assert "disk" in plan.values()


def test_infer_auto_device_map_warns_like_accelerate_when_offloaded_buffers_fit_no_accelerator():
    model = _net()
    kwargs = {
        "max_memory": {0: 2 * 6400 + 100, "cpu": 100 * BLOCK},
        "no_split_module_classes": ["Block"],
    }
    with pytest.warns(UserWarning, match="offload_buffers=True"):
        accelerate_utils.infer_auto_device_map(model, **kwargs)
    with pytest.warns(UserWarning, match="offload_buffers=True"):
        bma.infer_auto_device_map(model, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bma.infer_auto_device_map(model, **kwargs, offload_buffers=True)


def test_infer_auto_device_map_sends_a_block_that_fits_in_no_memory_to_disk_as_accelerate_does():
    kwargs = {"max_memory": {"cpu": 100, "disk": None}, "no_split_module_classes": ["Block"]}
    assert dict(bma.infer_auto_device_map(_net(), **kwargs)) == dict(
        accelerate_utils.infer_auto_device_map(_net(), **kwargs)
    )


@pytest.mark.parametrize("low_zero", [False, True])
def test_get_balanced_memory_returns_accelerates_budgets_with_integer_keys(low_zero):
    model = _net()
    max_memory = {0: 10 * BLOCK, 1: 10 * BLOCK, 2: "100KB", "cpu": "1MB"}
    theirs = accelerate_utils.get_balanced_memory(
        model, dict(max_memory), ["Block"], low_zero=low_zero
    )
    ours = bma.get_balanced_memory(model, dict(max_memory), ["Block"], low_zero=low_zero)
    assert ours == theirs
    assert list(ours) == [0, 1, 2, "cpu"]


def test_get_balanced_memory_without_accelerators_returns_the_budgets():
    assert bma.get_balanced_memory(_net(), {"cpu": "1MB", "disk": None}) == {"cpu": 10**6}


# -- tensors -----------------------------------------------------------------------------------


def test_find_tied_parameters_lists_the_same_groups_as_accelerate():
    model = _net(tie=True)
    model.blocks[1].fc.weight = model.blocks[0].fc.weight
    ours = bma.find_tied_parameters(model)
    theirs = accelerate_utils.find_tied_parameters(model)
    assert sorted(ours) == sorted(theirs)
    assert all(isinstance(group, list) for group in ours)
    assert bma.find_tied_parameters(_net()) == [] == accelerate_utils.find_tied_parameters(_net())


def test_retie_parameters_makes_one_parameter_again_as_accelerate_does():
    for retie in (bma.retie_parameters, accelerate_utils.retie_parameters):
        model = _net(tie=True)
        groups = bma.find_tied_parameters(model)
        model.head.weight = nn.Parameter(torch.empty_like(model.head.weight, device="meta"))
        retie(model, groups)
        assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_set_module_tensor_to_device_gives_what_accelerate_gives(dtype):
    value = torch.randn(HIDDEN, HIDDEN)
    results = []
    for setter in (bma.set_module_tensor_to_device, accelerate_utils.set_module_tensor_to_device):
        with bma.init_empty_weights():
            model = _mlp(2)
        setter(model, "1.weight", "cpu", value=value, dtype=dtype)
        results.append(model[1].weight)
    ours, theirs = results
    assert type(ours) is type(theirs) is nn.Parameter
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert ours.requires_grad == theirs.requires_grad


def test_set_module_tensor_to_device_refuses_what_accelerate_refuses():
    for setter in (bma.set_module_tensor_to_device, accelerate_utils.set_module_tensor_to_device):
        with bma.init_empty_weights():
            model = _mlp(1)
        with pytest.raises(ValueError, match="meta"):
            setter(model, "0.weight", "cpu")
        with pytest.raises(ValueError, match="shape"):
            setter(model, "0.weight", "cpu", value=torch.zeros(3))
        with pytest.raises(ValueError, match="nope"):
            setter(model, "0.nope", "cpu", value=torch.zeros(3))


# -- dispatch and offload ------------------------------------------------------------------------

MIXED = {
    "embed": "cpu",
    "blocks.0": "cpu",
    "blocks.1": "disk",
    "blocks.2": "disk",
    "blocks.3": "cpu",
    "blocks.4": "disk",
    "blocks.5": "cpu",
    "head": "disk",
}


def test_dispatch_model_with_disk_entries_gives_accelerates_outputs(tmp_path):
    reference = _net()
    expected = reference(IDS)
    theirs = accelerate.dispatch_model(copy.deepcopy(reference), MIXED, offload_dir=tmp_path / "a")
    ours = bma.dispatch_model(copy.deepcopy(reference), MIXED, offload_dir=tmp_path / "b")
    assert torch.equal(ours(IDS), expected)
    assert torch.equal(ours(IDS), theirs(IDS))
    assert ours.hf_device_map == theirs.hf_device_map == MIXED
    assert ours.blocks[1].fc.weight.is_meta  # released between forwards, as accelerate does
    assert theirs.blocks[1].fc.weight.is_meta


def test_dispatch_model_refuses_a_map_that_leaves_a_tensor_out_as_accelerate_does():
    partial = {k: v for k, v in MIXED.items() if k != "head"}
    for dispatch in (accelerate.dispatch_model, bma.dispatch_model):
        with pytest.raises(ValueError, match=r"head\.weight"):
            dispatch(_net(), partial, offload_dir="unused")


def test_dispatch_model_warns_about_a_key_that_names_no_module_as_accelerate_does(tmp_path):
    device_map = {"": "cpu", "nothing.here": "cpu"}
    for dispatch in (accelerate.dispatch_model, bma.dispatch_model):
        with pytest.warns(UserWarning, match="nothing.here"):
            dispatch(_net(), device_map)


def test_dispatch_model_on_one_device_moves_the_model_and_sets_hf_device_map():
    model = bma.dispatch_model(_net(), {"": "cpu"}, force_hooks=True)
    assert model.hf_device_map == {"": "cpu"}
    assert torch.equal(model(IDS), _net()(IDS))


def test_dispatch_model_writes_hf_device_map_in_one_spelling_whatever_the_map_says():
    model = bma.dispatch_model(_net(), {"": torch.device("cpu")}, force_hooks=True)
    assert model.hf_device_map == {"": "cpu"}  # accelerate keeps torch.device("cpu")


def test_dispatch_model_refuses_an_unknown_device_naming_its_key():
    with pytest.raises(bigmodel.PlanError, match=r"device_map\['head'\].*'gpu'"):
        bma.dispatch_model(_net(), {**MIXED, "head": "gpu"})


def _prefetch_of_dispatch(monkeypatch, main_device: str) -> object:
    """The read-ahead dispatch_model gives the offload hooks for an mlp kept on ``cpu``/``disk``
    that runs on ``main_device`` (the hooks are not attached: no accelerator is needed)."""
    import bigmodel.accelerate.dispatching as dispatching

    seen: dict[str, object] = {}

    def record(model, specs, device_map, *, execution_device, prefetch):
        seen.update(execution=execution_device, prefetch=prefetch)

    monkeypatch.setattr(dispatching, "attach_offload_hooks", record)
    device_map = {str(i): "cpu" if i % 2 else "disk" for i in range(4)}
    bma.dispatch_model(_mlp(4), device_map, main_device=main_device)
    assert seen["execution"] == main_device
    return seen["prefetch"]


def test_dispatch_model_reads_ahead_when_the_cpu_runs_the_offloaded_blocks(monkeypatch):
    assert _prefetch_of_dispatch(monkeypatch, "cpu") is True


def test_dispatch_model_reads_no_block_ahead_on_an_accelerator_its_plan_kept_one_block_of_room(
    monkeypatch,
):
    # infer_auto_device_map keeps room on the accelerator for one streamed block, as accelerate
    assert _prefetch_of_dispatch(monkeypatch, "cuda:0") is False


def test_dispatch_model_keeps_buffers_resident_unless_offload_buffers(tmp_path):
    resident = bma.dispatch_model(_net(), {"": "disk"}, offload_dir=tmp_path / "a")
    assert not resident.blocks[0].gain.is_meta
    offloaded = bma.dispatch_model(
        _net(), {"": "disk"}, offload_dir=tmp_path / "b", offload_buffers=True
    )
    assert offloaded.blocks[0].gain.is_meta
    assert torch.equal(resident(IDS), _net()(IDS))


def test_cpu_offload_gives_accelerates_outputs():
    expected = _net()(IDS)
    ours = bma.cpu_offload(_net())
    theirs = accelerate.cpu_offload(_net())
    assert torch.equal(ours(IDS), expected)
    assert torch.equal(theirs(IDS), expected)


def test_disk_offload_gives_accelerates_outputs_and_releases_the_weights(tmp_path):
    expected = _net()(IDS)
    ours = bma.disk_offload(_net(), tmp_path / "ours")
    theirs = accelerate.disk_offload(_net(), tmp_path / "theirs")
    assert torch.equal(ours(IDS), expected)
    assert torch.equal(theirs(IDS), expected)
    assert ours.blocks[0].fc.weight.is_meta and theirs.blocks[0].fc.weight.is_meta
    assert any((tmp_path / "ours").iterdir())


def test_cpu_offload_with_hook_returns_the_model_and_a_hook_that_offloads_and_removes():
    for offload_with_hook in (bma.cpu_offload_with_hook, accelerate.cpu_offload_with_hook):
        first, hook_1 = offload_with_hook(_net(), "cpu")
        second, hook_2 = offload_with_hook(_net(1), "cpu", prev_module_hook=hook_1)
        assert torch.equal(second(first(IDS).argmax(-1)), _net(1)(_net()(IDS).argmax(-1)))
        assert hook_2.model is second
        hook_2.offload()
        hook_2.remove()
        assert next(second.parameters()).device.type == "cpu"
    assert not second._forward_pre_hooks


def test_remove_hook_from_submodules_leaves_a_model_that_runs_without_hooks(tmp_path):
    expected = _net()(IDS)
    for dispatch, remove, folder in (
        (accelerate.dispatch_model, accelerate_hooks.remove_hook_from_submodules, "a"),
        (bma.dispatch_model, bma.remove_hook_from_submodules, "b"),
    ):
        model = dispatch(_net(), MIXED, offload_dir=tmp_path / folder)
        remove(model)
        assert not model.blocks[1].fc.weight.is_meta
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        assert torch.equal(model(IDS), expected)


def test_remove_hook_from_submodules_removes_a_cpu_offload_with_hook():
    model, _ = bma.cpu_offload_with_hook(_net(), "cpu")
    bma.remove_hook_from_submodules(model)
    assert not model._forward_pre_hooks


def test_align_module_device_materialises_an_offloaded_module_as_accelerate_does(tmp_path):
    reference = _net()
    for dispatch, align, folder in (
        (accelerate.dispatch_model, accelerate_modeling.align_module_device, "a"),
        (bma.dispatch_model, bma.align_module_device, "b"),
    ):
        model = dispatch(copy.deepcopy(reference), MIXED, offload_dir=tmp_path / folder)
        with align(model.blocks[1].fc):
            assert torch.equal(model.blocks[1].fc.weight, reference.blocks[1].fc.weight)
        assert model.blocks[1].fc.weight.is_meta


def test_get_state_dict_offloaded_model_reads_every_offloaded_tensor_back(tmp_path):
    reference = _net()
    ours = bma.get_state_dict_offloaded_model(
        bma.dispatch_model(copy.deepcopy(reference), MIXED, offload_dir=tmp_path / "b")
    )
    theirs = accelerate_modeling.get_state_dict_offloaded_model(
        accelerate.dispatch_model(copy.deepcopy(reference), MIXED, offload_dir=tmp_path / "a")
    )
    assert ours.keys() == reference.state_dict().keys() == theirs.keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor) and torch.equal(theirs[name], tensor)
        assert ours[name].device.type == "cpu"


# -- loading -----------------------------------------------------------------------------------


def _save(model: nn.Module, folder: os.PathLike[str], extra: dict[str, torch.Tensor] | None = None):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()} | (extra or {})
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_load_checkpoint_in_model_loads_what_accelerate_loads(tmp_path):
    folder = _save(_net(3), tmp_path / "ckpt")
    results = []
    for load in (bma.load_checkpoint_in_model, accelerate_utils.load_checkpoint_in_model):
        with bma.init_empty_weights():
            model = Net()
        assert load(model, folder, device_map={"": "cpu"}, dtype="float16") is None
        results.append(model.state_dict())
    ours, theirs = results
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype
        assert torch.equal(ours[name], theirs[name])


def test_load_checkpoint_in_model_warns_unused_keys_by_name_and_is_not_strict(tmp_path, caplog):
    folder = _save(_net(), tmp_path / "ckpt", extra={"stray.weight": torch.zeros(2)})
    with pytest.warns(UserWarning, match=r"stray\.weight"):
        bma.load_checkpoint_in_model(_net(1), folder)
    with caplog.at_level(logging.WARNING):
        accelerate_utils.load_checkpoint_in_model(_net(1), folder)
    assert "stray.weight" in caplog.text


def test_load_checkpoint_in_model_strict_raises_a_runtime_error_naming_the_key(tmp_path):
    folder = _save(_net(), tmp_path / "ckpt", extra={"stray.weight": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"stray\.weight"):
        bma.load_checkpoint_in_model(_net(1), folder, strict=True)
    with pytest.raises(RuntimeError, match=r"stray\.weight"):
        accelerate_utils.load_checkpoint_in_model(_net(1), folder, strict=True)


@pytest.mark.parametrize("device_map", ["auto", "sequential", "balanced", "balanced_low_0", MIXED])
def test_load_checkpoint_and_dispatch_gives_accelerates_outputs(tmp_path, device_map):
    reference = _net(2)
    folder = _save(reference, tmp_path / "ckpt")
    # no "disk" named: accelerate's get_balanced_memory fails on it (torch.device("disk"))
    max_memory = {"cpu": 3 * BLOCK + EMBED}
    models = []
    for load, name, budgets in (
        (bma.load_checkpoint_and_dispatch, "b", max_memory),
        (accelerate.load_checkpoint_and_dispatch, "a", _with_cpu_room(max_memory, EMBED)),
    ):
        with bma.init_empty_weights():
            model = Net()
        models.append(
            _quiet(
                functools.partial(
                    load,
                    model,
                    folder,
                    device_map=device_map,
                    max_memory=dict(budgets),
                    no_split_module_classes=["Block"],
                    offload_folder=tmp_path / name,
                )
            )
        )
    ours, theirs = models
    assert torch.equal(ours(IDS), reference(IDS))
    assert torch.equal(ours(IDS), theirs(IDS))
    assert ours.hf_device_map == theirs.hf_device_map
    assert "disk" in ours.hf_device_map.values()


def test_load_checkpoint_and_dispatch_refuses_an_unknown_device_map_name_as_accelerate_does(
    tmp_path,
):
    folder = _save(_net(), tmp_path / "ckpt")
    for load in (bma.load_checkpoint_and_dispatch, accelerate.load_checkpoint_and_dispatch):
        with pytest.raises(ValueError, match="balanced_low_0"):
            load(_net(), folder, device_map="fastest")


def test_importing_bigmodel_accelerate_leaves_accelerate_importable():
    import importlib

    import accelerate as real

    assert importlib.import_module("accelerate") is real
    assert real.__name__ == "accelerate" and hasattr(real, "Accelerator")
