import pytest
import torch

import bigmodel
from _models import LinearPair, PairNet
from bigmodel.foundations.devices import normalize_device
from bigmodel.foundations.errors import PlanError
from bigmodel.placement.device_map import compute_module_sizes, device_for, infer_device_map
from bigmodel.placement.planner import repeated_block_classes


def _empty(**kwargs) -> PairNet:
    with bigmodel.init_empty_weights():
        return PairNet(**kwargs)


def test_module_sizes_count_every_tensor_once_even_when_tied():
    sizes = compute_module_sizes(_empty())
    assert sizes["layers.0"] == 800
    assert sizes["layers.0.a"] == 400
    assert sizes["embed"] == 800
    assert sizes["head"] == 0  # its weight is the embedding's, counted there
    assert sizes[""] == 800 + 12 * 800 + 80
    assert compute_module_sizes(_empty(), dtype=torch.bfloat16)[""] == (800 + 12 * 800 + 80) // 2


def test_repeated_blocks_are_detected_as_units_that_must_not_be_split():
    assert repeated_block_classes(_empty()) == {LinearPair}


def test_everything_that_fits_on_one_device_is_one_entry():
    assert infer_device_map(_empty(), max_memory={"cpu": "1MB"}) == {"": "cpu"}


def test_devices_fill_in_order_with_whole_blocks():
    # cpu holds embed (800) + 3 layers (2400) = 3200 <= 3500; a 4th layer would overflow,
    # but the norm (80) after the layers still fits: the cpu is not closed by the layer.
    plan = infer_device_map(_empty(), max_memory={"cpu": 3500, "disk": None})
    assert plan == {
        "embed": "cpu",
        "layers.0": "cpu",
        "layers.1": "cpu",
        "layers.2": "cpu",
        **{f"layers.{i}": "disk" for i in range(3, 12)},
        "norm": "cpu",
        "head": "cpu",  # its weight is the embedding's: it goes where the embedding is
    }


def test_tied_modules_are_planned_together_and_charged_once():
    plan = infer_device_map(_empty(), max_memory={"cpu": 900, "disk": None})
    assert plan["embed"] == "cpu"
    assert device_for("head.weight", plan) == "cpu"  # follows its tied partner, costs nothing
    assert device_for("layers.0.a.weight", plan) == "disk"


def test_a_module_that_may_be_split_is_split_at_the_boundary():
    plan = infer_device_map(
        _empty(), max_memory={"cpu": 1200, "disk": None}, no_split_module_classes=[]
    )
    assert plan["embed"] == "cpu"
    assert plan["layers.0.a"] == "cpu"
    assert plan["layers.0.b"] == "disk"


def test_balanced_spreads_over_accelerators_and_sequential_fills_the_first():
    budgets = {0: "1MB", 1: "1MB", "cpu": "1MB"}
    sequential = infer_device_map(_empty(), max_memory=budgets, strategy="sequential")
    assert sequential == {"": "cuda:0"}
    balanced = infer_device_map(_empty(), max_memory=budgets, strategy="balanced")
    on_0 = [k for k, v in balanced.items() if v == "cuda:0"]
    on_1 = [k for k, v in balanced.items() if v == "cuda:1"]
    assert on_0 and on_1
    assert "layers.0" in on_0 and "layers.11" in on_1
    with pytest.raises(ValueError, match="Unknown strategy"):
        infer_device_map(_empty(), max_memory=budgets, strategy="random")


def test_device_map_keys_match_on_dot_boundaries_only():
    plan = {"layers.1": "cpu", "layers.10": "disk", "": "cuda:0"}
    assert device_for("layers.1.a.weight", plan) == "cpu"
    assert device_for("layers.10.a.weight", plan) == "disk"
    assert device_for("layers.11.a.weight", plan) == "cuda:0"
    assert device_for("layers.1", plan) == "cpu"
    assert device_for("x", {"layers.1": "cpu"}) is None


def test_a_block_larger_than_every_budget_is_an_error_that_says_what_to_change():
    with pytest.raises(PlanError) as info:
        infer_device_map(_empty(), max_memory={"cpu": 500, "disk": 0})
    message = str(info.value)
    assert "'embed'" in message or "'layers.0'" in message
    assert "cpu=500 B" in message and "disk=0 B" in message
    assert "allow disk (max_memory 'disk': None" in message and "raise max_memory" in message


def test_max_memory_without_disk_offloads_the_rest_to_disk_and_warns_with_the_bytes():
    with pytest.warns(UserWarning, match=r"names no 'disk': 7.20 KB of weights \(9 device-map"):
        plan = infer_device_map(_empty(), max_memory={"cpu": 3500})
    assert plan == infer_device_map(_empty(), max_memory={"cpu": 3500, "disk": None})
    assert device_for("layers.11", plan) == "disk"


def test_max_memory_without_disk_that_needs_no_disk_says_nothing(recwarn):
    assert infer_device_map(_empty(), max_memory={"cpu": "1MB"}) == {"": "cpu"}
    assert not [w for w in recwarn if "disk" in str(w.message)]


def test_disk_set_to_zero_forbids_disk_and_a_disk_size_bounds_it():
    with pytest.raises(PlanError, match=r"budgets: cpu=3.50 KB, disk=0 B"):
        infer_device_map(_empty(), max_memory={"cpu": 3500, "disk": 0})
    with pytest.raises(PlanError, match="or a larger 'disk' size"):
        infer_device_map(_empty(), max_memory="cpu=3500,disk=1000")
    plan = infer_device_map(_empty(), max_memory="cpu=3500,disk=8000")
    assert device_for("layers.11", plan) == "disk"


def test_devices_are_normalised():
    assert normalize_device(0) == "cuda:0"
    assert normalize_device("1") == "cuda:1"
    assert normalize_device(torch.device("cpu")) == "cpu"
    assert normalize_device("disk") == "disk"
    with pytest.raises(ValueError, match="Unknown device"):
        normalize_device("tpu")


def test_default_budgets_leave_a_reserve_for_activations():
    from bigmodel.foundations.devices import default_max_memory

    budgets = default_max_memory(reserve=0.5)
    import psutil

    assert budgets["cpu"] <= psutil.virtual_memory().available * 0.5 + 1
    assert budgets["disk"] is None


def test_estimate_memory_of_a_model_reports_bytes_per_device_and_the_largest_block():
    estimate = bigmodel.estimate_memory(_empty(), max_memory={"cpu": 3500, "disk": None})
    used = {d.device: d.used for d in estimate.devices}
    assert used == {"cpu": 800 + 3 * 800 + 80, "disk": 9 * 800}
    assert estimate.fits
    assert estimate.largest.nbytes == 800
    assert estimate.total == 800 + 12 * 800 + 80
    too_small = bigmodel.estimate_memory(_empty(), max_memory={"cpu": 500, "disk": 0})
    assert not too_small.fits
    rest_on_disk = bigmodel.estimate_memory(_empty(), max_memory={"cpu": 500})
    assert rest_on_disk.fits and rest_on_disk.implicit_disk
    assert rest_on_disk.devices[-1].device == "disk" and rest_on_disk.devices[-1].used > 0


def test_estimate_memory_of_a_checkpoint_plans_from_tensor_names(tmp_path):
    torch.manual_seed(0)
    bigmodel.save_checkpoint(PairNet(), tmp_path)
    estimate = bigmodel.estimate_memory(tmp_path, max_memory="cpu=3500,disk", dtype=torch.bfloat16)
    assert estimate.fits
    assert estimate.total == (800 + 12 * 800 + 80) // 2
    cpu = estimate.devices[0]
    assert cpu.device == "cpu" and cpu.blocks[:2] == ["embed", "layers.0"]
