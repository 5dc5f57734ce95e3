"""Each advanced concern of a load is one documented option type, checked before anything is read."""

import pytest
import torch

import bigmodel
from conftest import TiedNet


@pytest.fixture
def folder(tmp_path):
    bigmodel.save_checkpoint(TiedNet(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_an_unknown_io_mode_is_refused_with_the_accepted_modes():
    with pytest.raises(ValueError, match=r"io='fast': choose one of auto, mmap, pread"):
        bigmodel.IOOptions("fast")


def test_io_as_a_string_is_short_for_io_options_with_that_mode(folder):
    with bigmodel.init_empty_weights():
        short = TiedNet()
    with bigmodel.init_empty_weights():
        spelled = TiedNet()
    bigmodel.load_checkpoint(short, folder, io="pread")
    bigmodel.load_checkpoint(spelled, folder, io=bigmodel.IOOptions(mode="pread"))
    for (name, a), b in zip(short.state_dict().items(), spelled.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_bad_in_flight_bound_fails_when_the_options_are_built():
    with pytest.raises(ValueError, match="Invalid size 'lots'"):
        bigmodel.IOOptions("pread", inflight_bytes="lots")


def test_an_unknown_distributed_strategy_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match="strategy='fastest': choose one of auto, mmap, shm"):
        bigmodel.DistributedOptions(strategy="fastest")


def test_a_bad_prefetch_bound_fails_when_the_options_are_built():
    with pytest.raises(ValueError, match="Invalid size"):
        bigmodel.OffloadOptions(prefetch="-1MB")
    assert bigmodel.OffloadOptions(prefetch="2KB").prefetch_bytes == 2000
    assert bigmodel.OffloadOptions(prefetch=False).prefetch_bytes == 0
    assert bigmodel.OffloadOptions().prefetch_bytes is None  # the largest entry


@pytest.mark.parametrize(
    "old",
    [{"prefetch": False}, {"main_device": "cpu"}, {"strategy": "mmap"}, {"io_inflight_bytes": 1}],
)
def test_the_keywords_that_moved_into_option_types_are_not_accepted_any_more(folder, old):
    with bigmodel.init_empty_weights():
        model = TiedNet()
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        bigmodel.load_checkpoint(model, folder, **old)


def test_the_common_call_needs_no_option_type(folder):
    with bigmodel.init_empty_weights():
        model = TiedNet()
    report = bigmodel.load_checkpoint(model, folder, dtype=torch.bfloat16)
    assert not report.missing_keys
    assert model.embed.weight.dtype == torch.bfloat16


def test_a_dtype_can_be_named_the_way_the_command_line_names_it(folder, tmp_path):
    with bigmodel.init_empty_weights():
        model = TiedNet()
    bigmodel.load_checkpoint(model, folder, dtype="bf16")
    assert model.embed.weight.dtype == torch.bfloat16
    saved = bigmodel.save_checkpoint(model, tmp_path / "half", dtype="float16")
    with bigmodel.open_checkpoint(saved.directory) as ckpt:
        assert ckpt.tensor_info("embed.weight").dtype == torch.float16
    estimate = bigmodel.estimate_memory(folder, max_memory="cpu=1GB", dtype="torch.bfloat16")
    full = bigmodel.estimate_memory(folder, max_memory="cpu=1GB").total
    step = 8  # the int64 buffer keeps its dtype
    assert estimate.total == (full - step) // 2 + step


def test_an_unknown_dtype_name_is_refused_with_the_accepted_names(folder):
    with bigmodel.init_empty_weights():
        model = TiedNet()
    with pytest.raises(ValueError, match=r"Unknown dtype 'bf61': use one of bf16, bfloat16"):
        bigmodel.load_checkpoint(model, folder, dtype="bf61")


def test_the_planner_sizes_a_model_at_a_dtype_given_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert bigmodel.compute_module_sizes(model, "bf16")[""] == 80  # 40 parameters, 2 bytes
    assert bigmodel.compute_module_sizes(model, torch.bfloat16) == bigmodel.compute_module_sizes(
        model, "bfloat16"
    )
    plan = bigmodel.infer_device_map(model, max_memory={"cpu": "100B", "disk": None}, dtype="bf16")
    assert plan == {"": "cpu"}  # 80 bytes in bf16 fit where 160 in fp32 would not


def _split_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


@pytest.mark.parametrize("device_map", ["cpu", "disk", "sequential", "balanced", "auto"])
def test_device_map_takes_accelerates_names_and_a_single_device(tmp_path, device_map):
    source = _split_model()
    bigmodel.save_checkpoint(source, tmp_path)
    with bigmodel.init_empty_weights():
        model = _split_model()
    report = bigmodel.load_checkpoint(
        model, tmp_path, device_map=device_map, max_memory={"cpu": "1GB", "disk": None}
    )
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    expected = sorted(source.state_dict()) if device_map == "disk" else []
    assert report.offloaded_keys == expected


def test_an_unknown_device_map_name_lists_what_is_accepted(tmp_path):
    bigmodel.save_checkpoint(_split_model(), tmp_path)
    with bigmodel.init_empty_weights():
        model = _split_model()
    with pytest.raises(ValueError, match=r"device_map='fastest': pass 'auto', 'sequential'"):
        bigmodel.load_checkpoint(model, tmp_path, device_map="fastest")
