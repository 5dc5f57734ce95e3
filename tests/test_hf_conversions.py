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

#: Sizes shared by the decoder-only configs (tiny: each model saves and loads in milliseconds).
L = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32)
#: Sizes shared by the encoder-decoder configs (BART, Whisper).
ED = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
)
#: 24 architectures: decoder-only, MoE in the original layout (fused on load), encoder-decoder
#: with 4-way ties (T5, BART), Mamba, vision, speech, dual-tower (CLIP), encoders.
ZOO = {
    "llama": (
        tf.LlamaForCausalLM,
        lambda: tf.LlamaConfig(vocab_size=64, num_key_value_heads=1, tie_word_embeddings=True, **L),
    ),
    "mistral": (
        tf.MistralForCausalLM,
        lambda: tf.MistralConfig(vocab_size=64, num_key_value_heads=1, **L),
    ),
    "qwen2": (
        tf.Qwen2ForCausalLM,
        lambda: tf.Qwen2Config(vocab_size=64, num_key_value_heads=1, **L),
    ),
    "gemma": (
        tf.GemmaForCausalLM,
        lambda: tf.GemmaConfig(vocab_size=64, num_key_value_heads=1, head_dim=8, **L),
    ),
    "gpt2": (
        tf.GPT2LMHeadModel,
        lambda: tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32),
    ),
    "gpt_neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(vocab_size=64, **L)),
    "opt": (
        tf.OPTForCausalLM,
        lambda: tf.OPTConfig(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        ),
    ),
    "phi": (tf.PhiForCausalLM, lambda: tf.PhiConfig(vocab_size=64, **L)),
    "falcon": (
        tf.FalconForCausalLM,
        lambda: tf.FalconConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
        ),
    ),
    "bloom": (
        tf.BloomForCausalLM,
        lambda: tf.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2),
    ),
    "mixtral": (
        tf.MixtralForCausalLM,
        lambda: tf.MixtralConfig(
            vocab_size=64, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, **L
        ),
    ),
    "qwen2_moe": (
        tf.Qwen2MoeForCausalLM,
        lambda: tf.Qwen2MoeConfig(
            vocab_size=64,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            **L,
        ),
    ),
    "qwen3_moe": (
        tf.Qwen3MoeForCausalLM,
        lambda: tf.Qwen3MoeConfig(
            vocab_size=64,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            head_dim=8,
            **L,
        ),
    ),
    "olmoe": (
        tf.OlmoeForCausalLM,
        lambda: tf.OlmoeConfig(
            vocab_size=64, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, **L
        ),
    ),
    "t5": (
        tf.T5ForConditionalGeneration,
        lambda: tf.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
        ),
    ),
    "bart": (
        tf.BartForConditionalGeneration,
        lambda: tf.BartConfig(**ED, max_position_embeddings=32),
    ),
    "mamba": (
        tf.MambaForCausalLM,
        lambda: tf.MambaConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2
        ),
    ),
    "vit": (tf.ViTModel, lambda: tf.ViTConfig(image_size=16, patch_size=8, **L)),
    "clip": (
        tf.CLIPModel,
        lambda: tf.CLIPConfig(
            text_config=dict(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                projection_dim=8,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=8,
                projection_dim=8,
            ),
            projection_dim=8,
        ),
    ),
    "whisper": (
        tf.WhisperForConditionalGeneration,
        lambda: tf.WhisperConfig(
            **ED,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
    ),
    "wav2vec2": (
        tf.Wav2Vec2Model,
        lambda: tf.Wav2Vec2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
    ),
    "bert": (
        tf.BertForMaskedLM,
        lambda: tf.BertConfig(vocab_size=64, max_position_embeddings=32, **L),
    ),
    "roberta": (
        tf.RobertaForMaskedLM,
        lambda: tf.RobertaConfig(vocab_size=64, max_position_embeddings=40, **L),
    ),
    "distilbert": (
        tf.DistilBertForMaskedLM,
        lambda: tf.DistilBertConfig(
            vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32
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
def test_a_transformers_checkpoint_loads_strictly_and_bit_exactly_as_from_pretrained(
    original_layout, dtype
):
    model_cls, folder = original_layout
    reference = model_cls.from_pretrained(folder, dtype=dtype)
    with bigmodel.init_empty_weights():
        model = model_cls(reference.config)
    report = bigmodel.load_checkpoint(model, folder, dtype=dtype)  # strict
    assert report.missing_keys == report.unexpected_keys == report.mismatched_keys == []
    theirs, ours = reference.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def test_fused_experts_are_built_from_every_expert_and_reported(tmp_path):
    model_cls, config = ZOO["mixtral"]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_tensors_of_disk_offloaded_modules_are_written_once_and_run_exactly(
    tmp_path, dtype
):
    model_cls, config = ZOO["mixtral"]
    torch.manual_seed(0)
    model_cls(config()).save_pretrained(tmp_path / "ckpt")
    reference = model_cls.from_pretrained(tmp_path / "ckpt", dtype=dtype).eval()
    with bigmodel.init_empty_weights():
        model = model_cls(config())
    offload = tmp_path / "offload"
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}
    device_map |= {"model.rotary_emb": "cpu", "lm_head": "cpu"}
    report = bigmodel.load_checkpoint(
        model, tmp_path / "ckpt", dtype=dtype, device_map=device_map, offload_folder=offload
    )
    assert len(report.converted_keys) == 4
    assert model.model.layers[0].mlp.experts.gate_up_proj.is_meta  # offloaded, not resident
    written = sorted(p.name for p in offload.glob("offload-converted-*.safetensors"))
    assert len(written) == len(report.converted_keys)  # each built once, a file per group
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference(ids).logits)


def test_a_checkpoint_already_in_the_converted_layout_loads_without_conversions(tmp_path):
    model_cls, config = ZOO["mixtral"]
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
        # every name transformers wrote (bigmodel adds the tied names as aliases)
        assert set(source.keys()) <= set(ckpt.keys())
    reloaded, info = model_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_every_moe_checkpoint_in_the_original_layout_has_its_experts_fused_on_load(tmp_path, name):
    model_cls, config = ZOO[name]
    model_cls(config()).save_pretrained(tmp_path)
    with bigmodel.init_empty_weights():
        model = model_cls(config())
    report = bigmodel.load_checkpoint(model, tmp_path)
    fused = [k for k in report.converted_keys if k.endswith(("gate_up_proj", "down_proj"))]
    assert len(fused) == 2 * model.config.num_hidden_layers, report.converted_keys


@pytest.mark.parametrize(
    ("ops", "patterns"),
    [
        ("merge+cat1", ["a.*.w1.weight", "a.*.w3.weight"]),
        ("merge", ["a.*.w2.weight"]),
        ("merge+cat0", ["a.*.x", "a.*.y"]),
        ("merge+cat-1", ["a.*.x", "a.*.y"]),
    ],
)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_experts_are_stacked_in_one_allocation_exactly_as_transformers_operations_stack_them(
    ops, patterns, dtype
):
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    from bigmodel.placement.conversions import DerivedGroup

    chain = [MergeModulelist(dim=0)]
    if ops.startswith("merge+cat"):
        chain.append(Concatenate(dim=int(ops.removeprefix("merge+cat"))))
    converter = WeightConverter(patterns, ["t"], chain)
    tensors = {p: [torch.randn(3, 5) for _ in range(4)] for p in converter.source_patterns}
    ours = DerivedGroup(converter, "layer.t").build(tensors, None, dtype)
    theirs = {p: [t if dtype is None else t.to(dtype) for t in ts] for p, ts in tensors.items()}
    for op in chain:
        theirs = op.convert(
            theirs,
            source_patterns=converter.source_patterns,
            target_patterns=converter.target_patterns,
        )
    (expected,) = theirs.values()
    (built,) = ours.values()
    assert built.dtype == expected.dtype and torch.equal(built, expected)
