"""Issue 14's planner conventions: headroom on the execution device, balanced_low_0, max_memory
without disk, accelerate's device values and ``model.hf_device_map``.

Plans name accelerators without one existing: planning is pure, so budgets for ``cuda:0`` are
planned on this CPU-only machine; loads that would move tensors there are GPU checks.
"""

import json
import warnings

import pytest
import torch

import bigmodel
from _models import PairNet
from bigmodel.foundations.devices import accelerate_device, normalize_device, parse_max_memory
from bigmodel.foundations.errors import PlanError
from bigmodel.placement.device_map import device_for, infer_device_map
from bigmodel.placement.planner import atoms, plan, tree_from_module
from test_device_map import _empty

TOTAL = 800 + 12 * 800 + 80  # PairNet: embed 800, 12 layers of 800, norm 80, head tied to embed
LAYER = 800


def _streamed(model, device_map) -> list[int]:
    tree = tree_from_module(model)
    return [a.nbytes for a in atoms(tree) if device_for(a.name, device_map) in ("cpu", "disk")]


def _on(device_map: dict, device: str) -> int:
    return sum(1 for i in range(12) if device_for(f"layers.{i}", device_map) == device)


# -- headroom --------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefetch", "room"), [(False, LAYER), (True, 2 * LAYER), (100, 900)])
def test_the_execution_device_keeps_room_for_the_largest_streamed_block_and_the_prefetch_window(
    prefetch, room
):
    # cuda:0 holds exactly everything but one layer: filled to its limit, it would have no
    # room left for the layer streamed from cpu (nor for the one read ahead).
    budget = TOTAL - LAYER
    budgets = {0: budget, "cpu": LAYER, "disk": None}
    offload = bigmodel.OffloadOptions(prefetch=prefetch)
    device_map = infer_device_map(_empty(), max_memory=budgets, offload=offload)
    streamed = _streamed(_empty(), device_map)
    assert max(streamed) == LAYER
    placement = plan(tree_from_module(_empty()), parse_max_memory(budgets), prefetch=prefetch)
    assert placement.device_map == device_map
    assert placement.reserved == {"cuda:0": room}
    assert placement.used["cuda:0"] + room <= budget
    assert _on(device_map, "cuda:0") == 11 - -(-room // LAYER)  # 11 layers fit without room
    estimate = bigmodel.estimate_memory(_empty(), max_memory=budgets, offload=offload)
    assert estimate.fits and estimate.devices[0].reserved == room


def test_nothing_is_reserved_when_nothing_is_streamed_or_the_cpu_runs_the_streamed_blocks():
    fits = plan(tree_from_module(_empty()), {"cuda:0": TOTAL, "cpu": 0, "disk": None})
    assert fits.device_map == {"": "cuda:0"} and fits.reserved == {}
    on_cpu = plan(tree_from_module(_empty()), {"cpu": 3500, "disk": None})
    assert on_cpu.reserved == {}
    budgets = {0: TOTAL - LAYER, "cpu": LAYER, "disk": None}
    offload = bigmodel.OffloadOptions(main_device="cpu")
    device_map = infer_device_map(_empty(), max_memory=budgets, offload=offload)
    assert _on(device_map, "cuda:0") == 11  # the cpu runs the streamed layer: no room kept


def test_an_entry_streamed_whole_reserves_its_own_tensors_held_around_its_largest_block():
    # main_device=0 with no budget left on it: everything is on disk as one entry, {"": "disk"};
    # the hooks hold embed + norm for the root's forward while each layer comes and goes.
    tree = tree_from_module(_empty())
    placement = plan(tree, {"cuda:0": 0, "disk": None}, execution="cuda:0", prefetch=False)
    assert placement.device_map == {"": "disk"}
    assert placement.reserved == {"cuda:0": 800 + 80 + LAYER}
    assert placement.over_budget() == {"cuda:0": 800 + 80 + LAYER}
    ahead = plan(tree, {"cuda:0": 0, "disk": None}, execution="cuda:0")
    assert ahead.reserved == {"cuda:0": 800 + 80 + LAYER + (800 + 80)}  # the largest unit ahead


def test_an_accelerator_too_small_for_the_reserve_hands_the_streamed_blocks_to_the_cpu():
    # 1500 B hold one layer, not one layer plus room for two streamed ones: the plan puts
    # nothing on cuda:0, so nothing runs there and no room is needed.
    budgets = {0: 1500, "cpu": 1000, "disk": None}
    placement = plan(tree_from_module(_empty()), parse_max_memory(budgets))
    assert placement.fits and placement.reserved == {}
    assert "cuda:0" not in placement.device_map.values()


def test_a_main_device_too_small_for_the_reserve_is_a_plan_error_that_says_what_to_change():
    offload = bigmodel.OffloadOptions(main_device=0)
    with pytest.raises(PlanError) as info:
        infer_device_map(_empty(), max_memory={0: 1500, "cpu": 1000, "disk": None}, offload=offload)
    message = str(info.value)
    assert "cuda:0 runs the modules kept on cpu/disk and must keep 1.60 KB free" in message
    assert "budget is 1.50 KB" in message and "prefetch=False" in message


# -- max_memory without disk -------------------------------------------------------------------


def test_load_checkpoint_with_a_budget_without_disk_offloads_the_rest_and_warns(tmp_path):
    torch.manual_seed(0)
    source = PairNet()
    bigmodel.save_checkpoint(source, tmp_path)
    with bigmodel.init_empty_weights():
        model = PairNet()
    with pytest.warns(UserWarning, match=r"max_memory names no 'disk': .* offloaded to disk"):
        report = bigmodel.load_checkpoint(
            model, tmp_path, device_map="auto", max_memory={"cpu": 3500}
        )
    assert "layers.11.a.weight" in report.offloaded_keys
    assert model.hf_device_map["layers.11"] == "disk"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


def test_bigmodel_estimate_shows_the_reserve_and_plans_the_rest_on_disk_without_disk(
    tmp_path, capsys
):
    from bigmodel.cli import main

    bigmodel.save_checkpoint(PairNet(), tmp_path)
    code = main(["estimate", str(tmp_path), "--max-memory", f"0={TOTAL - LAYER},cpu=800", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["fits"] and data["implicit_disk"]
    gpu, _, disk = data["devices"]
    assert gpu["device"] == "cuda:0" and gpu["reserved"] == 2 * LAYER
    assert gpu["used"] + gpu["reserved"] <= TOTAL - LAYER and disk["used"] > 0
    assert main(["estimate", str(tmp_path), "--max-memory", "cpu=800,disk=0"]) == 1
    out = capsys.readouterr().out
    assert "fits: no" in out and "allow disk" in out
    assert main(["estimate", str(tmp_path), "--max-memory", f"0={TOTAL - LAYER},cpu=800"]) == 0
    out = capsys.readouterr().out
    assert "reserved" in out and "1.60 KB" in out and "disk: not in --max-memory" in out


# -- balanced_low_0 --------------------------------------------------------------------------


def test_balanced_low_0_gives_the_first_accelerator_only_what_the_others_cannot_hold():
    from accelerate.utils import get_balanced_memory

    budgets = {0: 10**6, 1: 4000, 2: 4000, "cpu": 10**6}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate: "Device 1 is not available"
        reference = get_balanced_memory(_empty(), budgets, low_zero=True)
    placement = plan(
        tree_from_module(_empty()), parse_max_memory(budgets), strategy="balanced_low_0"
    )
    assert placement.budgets["cuda:0"] == reference[0] == TOTAL - 8000
    assert placement.used["cuda:0"] <= TOTAL - 8000 < placement.used["cuda:1"]
    device_map = infer_device_map(_empty(), max_memory=budgets, strategy="balanced_low_0")
    assert device_map == placement.device_map
    assert _on(device_map, "cuda:0") < _on(device_map, "cuda:1")
    balanced = infer_device_map(_empty(), max_memory=budgets, strategy="balanced")
    assert _on(balanced, "cuda:0") > _on(device_map, "cuda:0")


def test_balanced_low_0_leaves_the_first_accelerator_empty_when_the_others_hold_the_model():
    placement = plan(
        tree_from_module(_empty()),
        parse_max_memory({0: "1MB", 1: "1MB", "cpu": "1MB"}),
        strategy="balanced_low_0",
    )
    assert placement.device_map == {"": "cuda:1"} and placement.budgets["cuda:0"] == 0


def test_balanced_low_0_is_a_device_map_name_of_load_checkpoint_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    source = PairNet()
    bigmodel.save_checkpoint(source, tmp_path)
    model = bigmodel.from_pretrained(
        PairNet, tmp_path, device_map="balanced_low_0", max_memory={"cpu": "1MB", "disk": None}
    )  # no accelerator: planned as "auto" (as accelerate does with fewer than two)
    assert torch.equal(model.layers[3].a.weight, source.layers[3].a.weight)


# -- device values ---------------------------------------------------------------------------


def test_devices_are_normalised_from_every_spelling_accelerate_and_torch_use():
    for spelling in [0, "0", "cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0)]:
        assert normalize_device(spelling) == "cuda:0"
    assert normalize_device(3) == "cuda:3"
    assert normalize_device("mps") == normalize_device(torch.device("mps")) == "mps:0"
    assert normalize_device("xpu") == "xpu:0" and normalize_device("xpu:1") == "xpu:1"
    assert normalize_device("npu:2") == "npu:2" and normalize_device("hpu") == "hpu:0"
    assert normalize_device(" cpu ") == normalize_device(torch.device("cpu")) == "cpu"
    for bad in ["meta", torch.device("meta"), -1, "gpu", "cuda:-1", 1.0, None]:
        with pytest.raises(PlanError, match=r"Unknown device .* \[no-placement\]"):
            normalize_device(bad)


def test_accelerate_device_values_are_integers_for_accelerator_indexes():
    assert accelerate_device("cuda:0") == 0 and accelerate_device("xpu:3") == 3
    assert accelerate_device("mps:0") == "mps"
    assert accelerate_device("cpu") == "cpu" and accelerate_device("disk") == "disk"


@pytest.mark.parametrize(
    "device_map", ["gpu", {"": "tpu"}, {"layers": "meta", "": "cpu"}], ids=["name", "dict", "meta"]
)
def test_an_unknown_device_in_a_device_map_is_a_plan_error_naming_it(tmp_path, device_map):
    bigmodel.save_checkpoint(PairNet(), tmp_path)
    with pytest.raises(PlanError, match=r"(device_map=|Unknown device )'(gpu|tpu|meta)'"):
        bigmodel.load_checkpoint(_empty(), tmp_path, device_map=device_map)
    with pytest.raises(PlanError, match="Unknown device"):
        bigmodel.dispatch_model(PairNet(), {"": "tpu"})


def test_a_device_mapped_load_sets_hf_device_map_as_accelerate_does(tmp_path):
    bigmodel.save_checkpoint(PairNet(), tmp_path / "ckpt")
    model = _empty()
    budgets = {"cpu": 3500, "disk": None}
    bigmodel.load_checkpoint(model, tmp_path / "ckpt", device_map="auto", max_memory=budgets)
    assert model.hf_device_map == infer_device_map(_empty(), max_memory=budgets)
    assert {"cpu", "disk"} == set(model.hf_device_map.values())
    dispatched = bigmodel.dispatch_model(PairNet(), {"": torch.device("cpu")})
    assert dispatched.hf_device_map == {"": "cpu"}
    plain = bigmodel.from_pretrained(PairNet, tmp_path / "ckpt", device_map="cpu")
    assert not hasattr(plain, "hf_device_map")  # transformers sets it for several devices only
    split = bigmodel.from_pretrained(
        PairNet, tmp_path / "ckpt", device_map="auto", max_memory=budgets
    )
    assert split.hf_device_map == model.hf_device_map


def test_hf_device_map_writes_accelerator_indexes_as_integers():
    from bigmodel.placement.device_map import set_hf_device_map

    model = PairNet()
    set_hf_device_map(model, {"embed": "cuda:0", "layers": "cuda:1", "norm": "cpu", "head": "disk"})
    assert model.hf_device_map == {"embed": 0, "layers": 1, "norm": "cpu", "head": "disk"}
    assert model.state_dict().keys() == PairNet().state_dict().keys()  # a plain attribute
