import pytest
import torch
from torch import nn

import bigmodel
from conftest import TiedNet, assert_same_state


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_sharded_checkpoint_loads_into_a_built_model(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path, max_shard_size=1000)
    torch.manual_seed(1)
    other = TiedNet()
    report = bigmodel.load_sharded_checkpoint(other, tmp_path)
    assert report.missing_keys == report.unexpected_keys == report.mismatched_keys == []
    assert sorted(report.loaded_keys) == sorted(
        k for k in tied_net.state_dict() if k != "head.weight"
    )
    assert_same_state(other.state_dict(), tied_net.state_dict())
    assert other.head.weight is other.embed.weight


def test_a_model_on_meta_gets_file_backed_weights_and_keeps_its_ties_and_grad_flags(
    tmp_path, tied_net
):
    bigmodel.save_checkpoint(tied_net, tmp_path, max_shard_size=1000)
    with torch.device("meta"):
        model = TiedNet()
    model.blocks[0].weight.requires_grad_(False)
    bigmodel.load_sharded_checkpoint(model, tmp_path)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.head.weight is model.embed.weight
    assert isinstance(model.blocks[1].weight, nn.Parameter)
    assert model.blocks[1].weight.requires_grad and not model.blocks[0].weight.requires_grad
    assert_same_state(model.state_dict(), tied_net.state_dict())


def test_a_checkpoint_with_only_one_of_two_tied_names_reports_nothing_missing(tmp_path, tied_net):
    state = {k: v for k, v in tied_net.state_dict().items() if k != "head.weight"}
    bigmodel.save_checkpoint({k: v.clone() for k, v in state.items()}, tmp_path)
    model = TiedNet()
    report = bigmodel.load_sharded_checkpoint(model, tmp_path)
    assert report.missing_keys == []
    assert torch.equal(model.head.weight, tied_net.embed.weight)


def test_a_strict_load_lists_every_mismatch_in_one_error_and_leaves_the_model_untouched(
    tmp_path, tied_net
):
    state = dict(tied_net.state_dict())
    del state["blocks.0.bias"], state["norm.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["zzz.bias"] = torch.zeros(2)
    bigmodel.save_checkpoint(state, tmp_path, max_shard_size=1000)
    torch.manual_seed(5)
    model = TiedNet()
    before = _params(model)
    with pytest.raises(bigmodel.KeyMismatchError) as info:
        bigmodel.load_sharded_checkpoint(model, tmp_path)
    message = str(info.value)
    for key in ("blocks.0.bias", "norm.weight", "extra.weight", "zzz.bias"):
        assert key in message
    assert sorted(info.value.missing_keys) == ["blocks.0.bias", "norm.weight"]
    assert sorted(info.value.unexpected_keys) == ["extra.weight", "zzz.bias"]
    assert "strict=False" in message
    assert_same_state(model.state_dict(), before)

    report = bigmodel.load_sharded_checkpoint(model, tmp_path, strict=False)
    assert sorted(report.missing_keys) == ["blocks.0.bias", "norm.weight"]
    assert sorted(report.unexpected_keys) == ["extra.weight", "zzz.bias"]
    assert torch.equal(model.blocks[1].weight, tied_net.blocks[1].weight)
    assert torch.equal(model.norm.weight, before["norm.weight"])


def test_a_shape_mismatch_is_an_error_even_when_not_strict(tmp_path, tied_net):
    state = dict(tied_net.state_dict())
    state["blocks.1.weight"] = torch.zeros(3, 3)
    bigmodel.save_checkpoint(state, tmp_path)
    with pytest.raises(bigmodel.KeyMismatchError, match="different shape") as info:
        bigmodel.load_sharded_checkpoint(TiedNet(), tmp_path, strict=False)
    assert info.value.mismatched_keys == ["blocks.1.weight"]


def test_weights_are_converted_to_the_dtype_of_the_model(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path)
    built = TiedNet().to(torch.bfloat16)
    bigmodel.load_sharded_checkpoint(built, tmp_path)
    with torch.device("meta"):
        empty = TiedNet().to(torch.bfloat16)
    bigmodel.load_sharded_checkpoint(empty, tmp_path)
    for model in (built, empty):
        assert model.embed.weight.dtype == torch.bfloat16
        assert model.step.dtype == torch.int64
        assert torch.equal(model.embed.weight, tied_net.embed.weight.to(torch.bfloat16))


def test_prefer_safe_chooses_between_safetensors_and_bin_in_one_folder(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path)
    other = {k: torch.full_like(v, 3) for k, v in tied_net.state_dict().items()}
    torch.save(other, tmp_path / "pytorch_model.bin")
    model = TiedNet()
    bigmodel.load_sharded_checkpoint(model, tmp_path)
    assert torch.equal(model.embed.weight, tied_net.embed.weight)
    bigmodel.load_sharded_checkpoint(model, tmp_path, prefer_safe=False)
    assert torch.equal(model.embed.weight, other["embed.weight"])


def test_a_legacy_sharded_bin_checkpoint_loads(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path, max_shard_size=1000, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin.index.json").exists()
    model = TiedNet()
    report = bigmodel.load_sharded_checkpoint(model, tmp_path)
    assert report.missing_keys == report.unexpected_keys == []
    assert_same_state(model.state_dict(), tied_net.state_dict())
