"""Checkpoints in the original layout load into transformers 5 classes, as from_pretrained does.

transformers 5 renames keys and fuses tensors at load time (MoE experts into one 3-D tensor,
...); save_pretrained writes the original layout, and the Hub holds it. bigmodel takes the
model's conversion list from transformers and builds each target tensor inside its own plan.
Each model is tiny; each case is compared bit for bit with from_pretrained.
"""

import pytest
import torch
import transformers as tf

import bigmodel

ZOO = {
    "mixtral (fused experts, renamed block)": (
        tf.MixtralForCausalLM,
        lambda: tf.MixtralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=3,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3-moe (fused experts)": (
        tf.Qwen3MoeForCausalLM,
        lambda: tf.Qwen3MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
        ),
    ),
    "gpt-neox (embed_out -> lm_head)": (
        tf.GPTNeoXForCausalLM,
        lambda: tf.GPTNeoXConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
    ),
    "vit (renamed attention keys)": (
        tf.ViTModel,
        lambda: tf.ViTConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
    ),
}


@pytest.fixture(scope="module", params=list(ZOO))
def original_layout(request, tmp_path_factory):
    model_cls, config = ZOO[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("original")
    model_cls(config()).save_pretrained(folder)  # transformers' default: the original layout
    return model_cls, folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_original_layout_checkpoint_loads_strictly_and_bit_exactly_as_from_pretrained(
    original_layout, dtype
):
    model_cls, folder = original_layout
    reference = model_cls.from_pretrained(folder, dtype=dtype)
    with bigmodel.init_empty_weights():
        model = model_cls(reference.config)
    report = bigmodel.load_checkpoint(model, folder, dtype=dtype)  # strict
    assert report.missing_keys == report.unexpected_keys == report.mismatched_keys == []
    assert report.converted_keys or report.renamed_keys
    theirs, ours = reference.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def test_fused_experts_are_built_from_every_expert_and_reported(tmp_path):
    model_cls, config = ZOO["mixtral (fused experts, renamed block)"]
    torch.manual_seed(0)
    model_cls(config()).save_pretrained(tmp_path)
    with bigmodel.init_empty_weights():
        model = model_cls(config())
    report = bigmodel.load_checkpoint(model, tmp_path)
    sources = report.converted_keys["model.layers.1.mlp.experts.gate_up_proj"]
    assert sorted(sources) == sorted(
        f"model.layers.1.block_sparse_moe.experts.{i}.{w}.weight"
        for w in ("w1", "w3")
        for i in range(3)
    )
    assert (
        report.renamed_keys["model.layers.0.block_sparse_moe.gate.weight"]
        == "model.layers.0.mlp.gate.weight"
    )
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (3, 64, 16)


def test_a_converted_tensor_to_be_offloaded_to_disk_is_refused_with_the_way_out(tmp_path):
    model_cls, config = ZOO["mixtral (fused experts, renamed block)"]
    model_cls(config()).save_pretrained(tmp_path)
    with bigmodel.init_empty_weights():
        model = model_cls(config())
    with pytest.raises(bigmodel.UnsupportedTensorError, match="save_checkpoint"):
        bigmodel.load_checkpoint(model, tmp_path, device_map={"": "disk"})


def test_a_checkpoint_already_in_the_converted_layout_loads_without_conversions(tmp_path):
    model_cls, config = ZOO["mixtral (fused experts, renamed block)"]
    torch.manual_seed(0)
    source = model_cls(config())
    bigmodel.save_checkpoint(source, tmp_path)  # the model's own (converted) names
    with bigmodel.init_empty_weights():
        model = model_cls(config())
    report = bigmodel.load_checkpoint(model, tmp_path)
    assert report.converted_keys == {} and report.renamed_keys == {}
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("safe", [True, False])
def test_a_model_saved_in_the_original_layout_is_read_back_by_transformers_bit_exactly(
    original_layout, tmp_path, safe
):
    model_cls, folder = original_layout
    with bigmodel.init_empty_weights():
        model = model_cls(model_cls.config_class.from_pretrained(folder))
    bigmodel.load_checkpoint(model, folder)
    out = tmp_path / "resaved"
    bigmodel.save_checkpoint(model, out, original_layout=True, safe_serialization=safe)
    model.config.save_pretrained(out)
    with bigmodel.open_checkpoint(out) as ckpt, bigmodel.open_checkpoint(folder) as source:
        assert sorted(ckpt.keys()) == sorted(source.keys())  # the names transformers wrote
    reloaded, info = model_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
