"""One planner, one budget parser, one dtype parser: a model and its checkpoint plan alike."""

import pytest
import torch

import bigmodel
from _models import PairNet
from bigmodel.foundations.devices import normalize_device, parse_max_memory, sort_devices
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.placement.device_map import device_for
from bigmodel.placement.planner import (
    PlanTensor,
    plan,
    tree_from_checkpoint,
    tree_from_module,
    tree_from_names,
)
from conftest import tiny_llama_config


def _summary(estimate):
    return (
        [(d.device, d.budget, d.blocks, d.used) for d in estimate.devices],
        [(b.name, b.nbytes, b.tensors) for b in estimate.unplaced],
        (estimate.largest.name, estimate.largest.nbytes, estimate.largest.tensors),
        estimate.total,
        estimate.fits,
    )


@pytest.fixture(scope="module")
def net_and_checkpoints(tmp_path_factory):
    """PairNet (repeated blocks, a head tied to the embedding) saved whole and in small shards."""
    torch.manual_seed(0)
    model = PairNet()
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    bigmodel.save_checkpoint(model, single)
    bigmodel.save_checkpoint(model, sharded, max_shard_size=2000)
    return model, single, sharded


BUDGETS = [
    {"cpu": "1MB"},
    {"cpu": 3500, "disk": None},
    {"cpu": 900, "disk": None},
    {0: 2000, 1: 2500, "cpu": 3000, "disk": None},
    {"cpu": 500},
    "0=1000,cpu=1700",
]


@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_model_and_the_checkpoint_saved_from_it_get_the_same_estimate(
    net_and_checkpoints, budgets, dtype, layout
):
    model, single, sharded = net_and_checkpoints
    folder = single if layout == "single" else sharded
    from_model = bigmodel.estimate_memory(model, max_memory=budgets, dtype=dtype)
    from_checkpoint = bigmodel.estimate_memory(folder, max_memory=budgets, dtype=dtype)
    assert _summary(from_model) == _summary(from_checkpoint)


@pytest.mark.parametrize("budgets", BUDGETS[:4])
def test_a_model_and_its_checkpoint_get_the_same_device_map(net_and_checkpoints, budgets):
    model, _, sharded = net_and_checkpoints
    parsed = parse_max_memory(budgets)
    with bigmodel.open_checkpoint(sharded) as ckpt:
        from_checkpoint = plan(tree_from_checkpoint(ckpt), parsed)
    from_model = plan(tree_from_module(model), parsed)
    assert from_model == from_checkpoint
    assert from_model.device_map == bigmodel.infer_device_map(model, max_memory=budgets)


def test_a_tied_head_follows_its_embedding_and_costs_nothing_in_a_checkpoint_too(
    net_and_checkpoints,
):
    _, single, _ = net_and_checkpoints
    estimate = bigmodel.estimate_memory(single, max_memory={"cpu": 900, "disk": None})
    cpu, disk = estimate.devices
    # no layer fits beside the embedding, but the norm (80 B) still does: the budget is filled
    assert cpu.blocks == ["embed", "norm", "head"] and cpu.used == 800 + 80
    assert "layers.0" in disk.blocks and disk.used == 12 * 800
    assert estimate.total == 800 + 12 * 800 + 80


def test_a_tiny_llama_and_its_checkpoint_put_every_tensor_on_the_same_device(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie=False))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    # cuda:0 keeps room for two streamed layers (the running one and the one read ahead)
    budgets = {0: "95KB", "cpu": "40KB", "disk": None}
    from_model = plan(tree_from_module(model), parse_max_memory(budgets)).device_map
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        from_checkpoint = plan(tree_from_checkpoint(ckpt), parse_max_memory(budgets)).device_map
        names = ckpt.keys()
    assert len({device_for(name, from_model) for name in names}) == 3
    for name in names:
        assert device_for(name, from_model) == device_for(name, from_checkpoint), name


def test_numbered_children_of_a_checkpoint_prefix_are_blocks_that_are_never_split():
    tensors = [
        PlanTensor(name, name, 100)
        for name in ["embed.weight", "layers.0.a", "layers.0.b", "layers.1.a", "layers.1.b"]
    ]
    tree = tree_from_names(tensors)
    layers = tree.children[1]
    assert [c.name for c in layers.children] == ["layers.0", "layers.1"]
    assert layers.splittable and not any(c.splittable for c in layers.children)
    # cpu has room for layers.0.a after embed, but a block is never split: both go to disk.
    placed = plan(tree, {"cpu": 250, "disk": None})
    assert placed.device_map == {"embed": "cpu", "layers": "disk"}
    assert placed.used == {"cpu": 100, "disk": 400}


def test_blocks_that_share_a_weight_are_placed_together_where_all_of_them_fit():
    sizes = [("embed.w", 100), ("layers.0.a", 50), ("layers.0.b", 100)]
    sizes += [("layers.1.a", 50), ("layers.1.b", 100), ("norm.w", 10)]
    shared = {"layers.0.a", "layers.1.a"}  # one tensor under two names: an ALBERT-like tie
    tree = tree_from_names(PlanTensor(n, "S" if n in shared else n, s) for n, s in sizes)
    # the two blocks need 250 bytes together: not beside the embedding on 300 bytes of cpu,
    # so both go to disk, and the norm after them still fills the cpu
    placed = plan(tree, {"cpu": 300, "disk": None})
    assert placed.device_map == {"embed": "cpu", "layers": "disk", "norm": "cpu"}
    assert placed.used == {"cpu": 110, "disk": 250} and placed.fits
    # no device holds the group: its first block is unplaced with the group's bytes, the
    # second goes with it at no further cost
    lost = plan(tree, {"cpu": 200})
    assert [(u.name, u.nbytes) for u in lost.unplaced] == [("layers.0", 250), ("layers.1", 0)]
    assert lost.device_map == {"embed": "cpu", "norm": "cpu"} and not lost.fits


def test_a_unit_that_fits_nowhere_is_listed_and_the_rest_is_still_placed():
    tensors = [PlanTensor(n, n, size) for n, size in [("big.w", 1000), ("small.w", 10)]]
    placed = plan(tree_from_names(tensors), {"cpu": 100})
    assert [(u.name, u.nbytes) for u in placed.unplaced] == [("big", 1000)]
    assert placed.device_map == {"small": "cpu"}
    assert not placed.fits


def test_the_budget_parser_reads_the_cli_string_and_the_dict_alike():
    from_string = parse_max_memory(" disk, cpu=8GB ,0=20GB,cuda:1=1.5GiB")
    from_dict = parse_max_memory(
        {"disk": None, "cpu": 8 * 10**9, 0: "20GB", torch.device("cuda", 1): "1.5GiB"}
    )
    assert from_string == from_dict
    assert list(from_string) == ["cuda:0", "cuda:1", "cpu", "disk"]
    assert from_string["cuda:1"] == int(1.5 * 2**30) and from_string["disk"] is None
    assert parse_max_memory("disk=1TB")["disk"] == 10**12


@pytest.mark.parametrize(
    ("budgets", "expected"),
    [
        ("tpu=8GB", r"Unknown device 'tpu'.*'cuda:0', 'cpu' or 'disk'"),
        ({"gpu": 1}, r"Unknown device 'gpu'"),
        ("cpu", r"max_memory for 'cpu' has no size: only 'disk' may be unlimited.*cpu=8GB"),
        ({0: None}, r"max_memory for 0 has no size: only 'disk' may be unlimited.*0=8GB"),
        ("cpu=8 gigs", r"max_memory for 'cpu': Invalid size '8 gigs'.*e.g. '10GB'"),
        ({"cpu": -1}, r"max_memory for 'cpu': Invalid size -1: sizes cannot be negative"),
        ("0=1GB,cuda:0=2GB", r"names 'cuda:0' twice.*one size"),
        ("", r"names no device: give at least one, e.g. 'cpu=8GB,disk'"),
        ({"cpu": 1.5}, r"max_memory for 'cpu' is 1.5: a size is a number of bytes"),
    ],
)
def test_the_budget_parser_names_the_device_the_rule_and_the_fix(budgets, expected):
    with pytest.raises(ValueError, match=expected):
        parse_max_memory(budgets)


def test_every_planner_entry_point_applies_the_same_budget_rule():
    with pytest.raises(ValueError, match="only 'disk' may be unlimited"):
        bigmodel.infer_device_map(PairNet(layers=2), max_memory={"cpu": None})
    with pytest.raises(ValueError, match="only 'disk' may be unlimited"):
        bigmodel.estimate_memory(PairNet(layers=2), max_memory="cpu")


def test_devices_have_one_spelling_and_one_order():
    assert normalize_device("cpu:0") == "cpu"
    assert normalize_device("cuda") == "cuda:0"
    assert normalize_device(torch.device("cuda", 3)) == "cuda:3"
    assert sort_devices(["disk", "cpu", "cuda:10", "cuda:2"]) == [
        "cuda:2",
        "cuda:10",
        "cpu",
        "disk",
    ]
    for bad in ["disk:0", True, "gpu"]:
        with pytest.raises(ValueError, match="Unknown device"):
            normalize_device(bad)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("float", torch.float32),
        (" Float32 ", torch.float32),
        ("fp64", torch.float64),
        (torch.float8_e4m3fn, torch.float8_e4m3fn),
    ],
)
def test_parse_dtype_accepts_the_usual_names_and_passes_dtypes_through(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("value", ["int8", "bf", "torch.", "", "float8", 16])
def test_parse_dtype_refuses_anything_else_and_lists_the_accepted_names(value):
    with pytest.raises(ValueError, match=r"Unknown dtype .*bf16, bfloat16, fp16.*half.*double"):
        parse_dtype(value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_parse_dtype_refuses_a_target_dtype_that_is_not_floating_point(dtype):
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        parse_dtype(dtype)


def test_parse_dtype_keeps_none_and_gives_auto_what_the_caller_resolved():
    assert parse_dtype(None) is None
    assert parse_dtype("auto") is None
    assert parse_dtype(" Auto ", auto=torch.bfloat16) is torch.bfloat16
