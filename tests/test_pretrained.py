import dataclasses
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import bigmodel
from conftest import TiedNet, assert_same_state, tiny_llama_config


def test_from_pretrained_accepts_a_class_and_returns_an_eval_model_with_no_meta(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path)
    model = bigmodel.from_pretrained(TiedNet, tmp_path)
    assert not model.training
    assert not any(p.is_meta for p in model.parameters())
    assert_same_state(model.state_dict(), tied_net.state_dict())


def test_from_pretrained_passes_load_options_through(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path)
    model = bigmodel.from_pretrained(
        lambda: TiedNet(vocab=32, hidden=16), tmp_path, dtype=torch.bfloat16
    )
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.step.dtype == torch.int64


def test_from_pretrained_refuses_a_factory_that_returns_no_module(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path)
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        bigmodel.from_pretrained(lambda: 3, tmp_path)


def test_a_transformers_model_built_empty_and_loaded_gives_the_logits_of_transformers_from_pretrained(
    tmp_path,
):
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_llama_config())
    original.save_pretrained(tmp_path, max_shard_size="40KB")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    config = tiny_llama_config()
    with bigmodel.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    report = bigmodel.load_checkpoint(model, tmp_path)
    model.eval()
    assert report.missing_keys == report.unexpected_keys == []
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    via_factory = bigmodel.from_pretrained(
        lambda: AutoModelForCausalLM.from_config(config), tmp_path
    )
    with torch.no_grad():
        assert torch.equal(via_factory(ids).logits, reference(ids).logits)


def test_a_transformers_causal_lm_checkpoint_loads_into_the_base_model_by_dropping_its_prefix(
    tmp_path,
):
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_llama_config())
    original.save_pretrained(tmp_path, max_shard_size="40KB")
    from transformers import LlamaModel

    with bigmodel.init_empty_weights():
        base = LlamaModel(tiny_llama_config())
    report = bigmodel.load_checkpoint(base, tmp_path)
    assert report.prefix == "removed 'model.'"
    assert_same_state(base.state_dict(), original.model.state_dict())


@dataclasses.dataclass
class NetConfig:
    vocab: int = 32
    hidden: int = 16


class ConfiguredNet(bigmodel.PretrainedMixin, nn.Module):
    config_class = NetConfig

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)


class DictNet(bigmodel.PretrainedMixin, nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config["width"], 2)


def test_the_mixin_round_trips_a_custom_model_with_a_dataclass_config(tmp_path):
    torch.manual_seed(0)
    net = ConfiguredNet(NetConfig(vocab=40, hidden=12))
    result = net.save_pretrained(tmp_path, max_shard_size=1000)
    assert len(result.files) > 1
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "vocab": 40,
        "hidden": 12,
        "_bigmodel_config_class": f"{__name__}:NetConfig",
    }
    loaded = ConfiguredNet.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config == NetConfig(vocab=40, hidden=12)
    assert loaded.embed.weight.dtype == torch.float64
    assert torch.equal(loaded.embed.weight, net.embed.weight.double())
    assert not any(name.startswith(".") for name in (p.name for p in tmp_path.iterdir()))


def test_the_mixin_handles_dict_configs_and_resaves_in_place(tmp_path):
    net = DictNet({"width": 5})
    net.save_pretrained(tmp_path)
    net.save_pretrained(tmp_path, max_shard_size=20)
    loaded = DictNet.from_pretrained(tmp_path)
    assert loaded.config == {"width": 5}
    assert_same_state(loaded.state_dict(), net.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_a_config_that_does_not_fit_the_config_class_is_a_clear_error(tmp_path):
    ConfiguredNet(NetConfig()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab": 3, "depth": 2}))
    with pytest.raises(bigmodel.BigModelError, match="does not fit NetConfig"):
        ConfiguredNet.from_pretrained(tmp_path)
