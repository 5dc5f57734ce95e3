import math

import pytest
import torch
from torch import nn

import bigmodel
from conftest import assert_same_state


class Rotary(nn.Module):
    """A non-persistent buffer computed by the module's own code, like rotary inv_freq."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False
        )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.rotary = Rotary()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.register_buffer("counts", torch.arange(4, dtype=torch.int32))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.rotary.inv_freq.repeat(2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _reference() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.norm.weight.normal_()
        net.counts.mul_(3)
    return net


@pytest.fixture
def saved(tmp_path):
    net = _reference()
    bigmodel.save_checkpoint(net, tmp_path / "ckpt", max_shard_size=600)
    return net, tmp_path / "ckpt"


def _empty(include_buffers: bool = False) -> Net:
    with bigmodel.init_empty_weights(include_buffers=include_buffers):
        return Net()


def _assert_nothing_on_meta(model: nn.Module) -> None:
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


# -- empty construction -----------------------------------------------------------------------
def test_init_empty_weights_puts_parameters_on_meta_and_keeps_buffers_real():
    net = _empty()
    assert all(p.is_meta for p in net.parameters())
    assert net.counts.device.type == "cpu"
    assert torch.equal(net.rotary.inv_freq, Rotary().inv_freq)
    assert net.head.weight is net.embed.weight


def test_include_buffers_moves_persistent_buffers_only():
    net = _empty(include_buffers=True)
    assert net.counts.is_meta
    assert not net.rotary.inv_freq.is_meta  # no checkpoint holds it: its value must be computed


def test_init_on_device_places_parameters_on_the_given_device():
    with bigmodel.init_on_device("cpu"):
        layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu"


def test_the_patch_is_removed_after_the_context_even_on_error():
    with pytest.raises(RuntimeError), bigmodel.init_empty_weights(include_buffers=True):
        raise RuntimeError("boom")
    assert not nn.Linear(2, 2).weight.is_meta
    module = nn.Module()
    module.register_buffer("b", torch.ones(1))
    assert not module.b.is_meta


# -- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("include_buffers", [False, True])
def test_a_meta_model_with_non_persistent_buffers_loads_and_runs_like_the_original(
    saved, include_buffers
):
    net, folder = saved
    model = _empty(include_buffers)
    report = bigmodel.load_checkpoint(model, folder)
    _assert_nothing_on_meta(model)
    assert report.missing_keys == report.unexpected_keys == report.initialized_keys == []
    assert report.bytes_read == sum(
        t.numel() * t.element_size() for k, t in net.state_dict().items() if k != "head.weight"
    )
    assert report.seconds > 0
    assert_same_state(model.state_dict(), net.state_dict())
    assert torch.equal(model.rotary.inv_freq, net.rotary.inv_freq)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), net(ids))


def test_a_model_built_under_torch_device_meta_is_refused_naming_its_lost_buffer(saved):
    _, folder = saved
    with torch.device("meta"):
        model = Net()
    with pytest.raises(
        bigmodel.MetaTensorError, match=r"non-persistent buffer 'rotary.inv_freq'"
    ) as info:
        bigmodel.load_checkpoint(model, folder)
    assert "init_empty_weights" in str(info.value)


def test_same_dtype_cpu_tensors_alias_the_file_and_tied_weights_are_read_once(saved):
    _, folder = saved
    model = _empty()
    with bigmodel.open_checkpoint(folder) as ckpt:
        report = bigmodel.load_checkpoint(model, ckpt)
        # The parameter is the file mapping itself: no copy was made.
        assert model.blocks[0].weight.data_ptr() == ckpt.get_tensor("blocks.0.weight").data_ptr()
    assert report.loaded_keys.count("embed.weight") == 1
    assert "head.weight" not in report.loaded_keys
    assert model.head.weight is model.embed.weight


def test_a_built_model_gets_new_tensors_assigned_not_copied_into(saved):
    net, folder = saved
    model = Net()
    old = model.blocks[0].weight
    bigmodel.load_checkpoint(model, folder)
    assert model.blocks[0].weight is not old
    assert isinstance(model.blocks[0].weight, nn.Parameter)
    assert model.blocks[0].weight.requires_grad
    assert_same_state(model.state_dict(), net.state_dict())


def test_dtype_casts_floating_point_tensors_and_leaves_integers_alone(saved):
    net, folder = saved
    model = _empty(include_buffers=True)
    bigmodel.load_checkpoint(model, folder, dtype=torch.bfloat16)
    assert model.blocks[0].weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[0].weight, net.blocks[0].weight.to(torch.bfloat16))
    assert model.counts.dtype == torch.int32
    assert torch.equal(model.counts, net.counts)


def test_dtype_overrides_keep_chosen_modules_in_float32_by_class_or_name(saved):
    _, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model,
        folder,
        dtype=torch.float16,
        dtype_overrides={nn.LayerNorm: torch.float32, "blocks.2": torch.float64},
    )
    assert model.norm.weight.dtype == torch.float32
    assert model.blocks[2].weight.dtype == torch.float64
    assert model.blocks[1].weight.dtype == torch.float16
    assert model.embed.weight.dtype == torch.float16


def test_prefix_overrides_match_on_dot_boundaries(saved):
    _, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, dtype=torch.float16, dtype_overrides={"block": torch.float32}
    )
    assert model.blocks[0].weight.dtype == torch.float16


def test_missing_weights_are_initialised_by_their_own_module_and_only_those(saved, monkeypatch):
    net, folder = saved
    state = {
        k: v
        for k, v in net.state_dict().items()
        if not k.startswith("blocks.1.") and k != "blocks.2.bias"
    }
    bigmodel.save_checkpoint(state, folder)
    calls = []
    original = nn.Linear.reset_parameters

    def spy(self):
        calls.append(
            (id(self), self.weight.is_meta, None if self.bias is None else self.bias.is_meta)
        )
        original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    model = _empty()
    calls.clear()  # construction calls reset_parameters too (on meta, for free)
    report = bigmodel.load_checkpoint(model, folder, strict=False)
    assert sorted(report.missing_keys) == ["blocks.1.bias", "blocks.1.weight", "blocks.2.bias"]
    assert sorted(report.initialized_keys) == sorted(report.missing_keys)
    # blocks.1 is initialised whole; for blocks.2 the loaded weight is hidden behind a meta twin.
    assert sorted(calls) == sorted(
        [(id(model.blocks[1]), False, False), (id(model.blocks[2]), True, False)]
    )
    assert torch.equal(model.blocks[2].weight, net.blocks[2].weight)
    bound = 1 / math.sqrt(8)
    assert model.blocks[2].bias.abs().max() <= bound and model.blocks[2].bias.abs().sum() > 0
    _assert_nothing_on_meta(model)


def test_missing_weights_of_a_built_model_keep_their_values(saved):
    net, folder = saved
    bigmodel.save_checkpoint(
        {k: v for k, v in net.state_dict().items() if k != "norm.bias"}, folder
    )
    model = Net()
    before = model.norm.bias.clone()
    report = bigmodel.load_checkpoint(model, folder, strict=False)
    assert report.missing_keys == ["norm.bias"]
    assert report.initialized_keys == []
    assert torch.equal(model.norm.bias, before)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(3))


class WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale()
        self.proj = nn.Linear(3, 3)


def test_a_missing_weight_with_no_initialiser_is_named_and_init_fn_fixes_it(tmp_path):
    bigmodel.save_checkpoint(WithScale().proj.state_dict(), tmp_path, metadata=None)
    with pytest.raises(bigmodel.MissingInitializerError, match=r"scale\.alpha.*init_fn"):
        bigmodel.load_checkpoint(
            _build_empty(WithScale), tmp_path, strict=False, key_mapping={r"^": "proj."}
        )
    seen = []

    def init_fn(module):
        seen.append(type(module).__name__)
        if isinstance(module, Scale):
            nn.init.constant_(module.alpha, 0.5)

    model = _build_empty(WithScale)
    report = bigmodel.load_checkpoint(
        model, tmp_path, strict=False, key_mapping={r"^": "proj."}, init_fn=init_fn
    )
    assert report.initialized_keys == ["scale.alpha"]
    assert seen == ["Scale"]
    assert torch.equal(model.scale.alpha, torch.full((3,), 0.5))


def _build_empty(cls):
    with bigmodel.init_empty_weights():
        return cls()


def test_init_missing_false_refuses_to_leave_weights_on_meta(saved):
    net, folder = saved
    bigmodel.save_checkpoint(
        {k: v for k, v in net.state_dict().items() if k != "norm.bias"}, folder
    )
    with pytest.raises(bigmodel.MetaTensorError, match=r"parameter 'norm.bias'"):
        bigmodel.load_checkpoint(_empty(), folder, strict=False, init_missing=False)


# -- keys ---------------------------------------------------------------------------------------
class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()


def test_a_checkpoint_of_a_wrapper_loads_into_the_inner_model_and_the_prefix_is_reported(tmp_path):
    torch.manual_seed(3)
    wrapper = Wrapper()
    bigmodel.save_checkpoint(wrapper, tmp_path)
    model = _empty()
    report = bigmodel.load_checkpoint(model, tmp_path)
    assert report.prefix == "removed 'model.'"
    assert report.renamed_keys["model.blocks.0.weight"] == "blocks.0.weight"
    assert_same_state(model.state_dict(), wrapper.model.state_dict())


def test_a_checkpoint_of_the_inner_model_loads_into_a_wrapper(saved):
    net, folder = saved
    wrapper = _build_empty(Wrapper)
    report = bigmodel.load_checkpoint(wrapper, folder)
    assert report.prefix == "added 'model.'"
    assert_same_state(wrapper.model.state_dict(), net.state_dict())


def test_exact_loads_never_rename_anything(saved):
    _, folder = saved
    report = bigmodel.load_checkpoint(_empty(), folder)
    assert report.prefix is None
    assert report.renamed_keys == {}


def test_load_sharded_checkpoint_does_not_guess_prefixes(tmp_path):
    bigmodel.save_checkpoint(Wrapper(), tmp_path)
    with pytest.raises(bigmodel.KeyMismatchError):
        bigmodel.load_sharded_checkpoint(Net(), tmp_path)


def test_key_mapping_renames_with_regexes_and_reports_each_rename(tmp_path):
    net = _reference()
    old_names = {
        k.replace("blocks.", "layers.").replace("norm.weight", "norm.gamma"): v
        for k, v in net.state_dict().items()
    }
    bigmodel.save_checkpoint(old_names, tmp_path)
    model = _empty()
    report = bigmodel.load_checkpoint(
        model, tmp_path, key_mapping={r"^layers\.": "blocks.", r"\.gamma$": ".weight"}
    )
    assert report.renamed_keys["layers.0.weight"] == "blocks.0.weight"
    assert report.renamed_keys["norm.gamma"] == "norm.weight"
    assert "embed.weight" not in report.renamed_keys
    assert_same_state(model.state_dict(), net.state_dict())


def test_two_keys_mapped_to_one_name_is_an_error(tmp_path):
    bigmodel.save_checkpoint({"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)}, tmp_path)
    with pytest.raises(bigmodel.KeyMappingError, match=r"'a\.weight' and 'b\.weight'"):
        bigmodel.load_checkpoint(nn.Linear(1, 1), tmp_path, key_mapping={r"^[ab]\.": ""})


# -- mismatches ----------------------------------------------------------------------------------
def test_a_shape_mismatch_names_both_shapes_and_the_way_out(saved):
    net, folder = saved
    state = dict(net.state_dict())
    state["blocks.1.weight"] = torch.zeros(4, 8)
    bigmodel.save_checkpoint(state, folder)
    with pytest.raises(bigmodel.KeyMismatchError) as info:
        bigmodel.load_checkpoint(_empty(), folder)
    text = str(info.value)
    assert "blocks.1.weight (checkpoint [4, 8], model [8, 8])" in text
    assert "ignore_mismatched_sizes=True" in text

    model = _empty()
    report = bigmodel.load_checkpoint(model, folder, ignore_mismatched_sizes=True)
    assert report.mismatched_keys == [bigmodel.MismatchedKey("blocks.1.weight", (4, 8), (8, 8))]
    assert report.initialized_keys == ["blocks.1.weight"]
    assert model.blocks[1].weight.shape == (8, 8)
    assert torch.equal(model.blocks[1].bias, net.blocks[1].bias)
    _assert_nothing_on_meta(model)


def test_a_strict_load_lists_missing_and_unexpected_together_and_changes_nothing(saved):
    net, folder = saved
    state = {k: v for k, v in net.state_dict().items() if k != "norm.bias"}
    state["surprise"] = torch.zeros(1)
    bigmodel.save_checkpoint(state, folder)
    model = _empty()
    with pytest.raises(bigmodel.KeyMismatchError) as info:
        bigmodel.load_checkpoint(model, folder)
    assert info.value.missing_keys == ["norm.bias"]
    assert info.value.unexpected_keys == ["surprise"]
    assert all(p.is_meta for p in model.parameters())
