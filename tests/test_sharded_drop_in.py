"""``load_sharded_checkpoint`` as transformers defines it: the result unpacks like its
``_IncompatibleKeys``, a strict failure is its ``RuntimeError``, the same files are picked and
the same tensors loaded. Each test runs the real transformers function beside bigmodel's."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.trainer_utils import load_sharded_checkpoint as hf_load_sharded_checkpoint

import bigmodel
from _layouts import BIN_INDEX, Mlp, seeded_mlp, write_index, write_shards
from conftest import assert_same_state


def _mismatched_checkpoint(folder: Path) -> Mlp:
    """Sharded safetensors lacking two model keys and holding two extra ones."""
    original = seeded_mlp(0)
    state = dict(original.state_dict())
    del state["norm.bias"], state["scale"]
    state["extra.weight"] = torch.ones(2)
    state["zzz"] = torch.zeros(1)
    write_index(folder, {"metadata": {}, "weight_map": write_shards(state, folder, 3)})
    return original


def test_the_result_unpacks_indexes_and_compares_like_the_one_transformers_returns(tmp_path):
    original = _mismatched_checkpoint(tmp_path)
    ours, theirs = seeded_mlp(4), seeded_mlp(4)

    result = bigmodel.load_sharded_checkpoint(ours, tmp_path, strict=False)
    expected = hf_load_sharded_checkpoint(theirs, tmp_path, strict=False)

    assert isinstance(expected, torch.nn.modules.module._IncompatibleKeys)
    missing, unexpected = result
    assert (missing, unexpected) == (expected.missing_keys, expected.unexpected_keys)
    assert missing == ["scale", "norm.bias"]  # in the model's state_dict order (buffer first)
    assert unexpected == ["extra.weight", "zzz"]
    assert result[0] == expected[0] and result[1] == expected[1] and result[-1] == expected[-1]
    assert result[:] == tuple(expected)
    assert len(result) == len(expected) == 2
    assert result == expected and expected == result
    assert result._fields == expected._fields
    assert result._asdict() == expected._asdict()
    assert isinstance(result, bigmodel.LoadReport)
    assert isinstance(result, bigmodel.ShardedLoadReport)
    assert sorted(result.loaded_keys) == sorted(k for k in ours.state_dict() if k not in missing)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    assert torch.equal(ours.fc2.weight, original.fc2.weight)


def test_a_strict_failure_is_the_runtime_error_transformers_raises_and_a_key_mismatch_error(
    tmp_path,
):
    _mismatched_checkpoint(tmp_path)
    with pytest.raises(RuntimeError) as reference:
        hf_load_sharded_checkpoint(seeded_mlp(4), tmp_path)
    model = seeded_mlp(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        bigmodel.load_sharded_checkpoint(model, tmp_path)

    err = info.value
    assert type(reference.value) is RuntimeError
    assert isinstance(err, bigmodel.LoadStateDictError)
    assert isinstance(err, bigmodel.KeyMismatchError)
    assert isinstance(err, bigmodel.BigModelError)
    assert err.code == "key-mismatch"
    assert sorted(err.missing_keys) == ["norm.bias", "scale"]
    assert err.unexpected_keys == ["extra.weight", "zzz"]
    for key in ("norm.bias", "scale", "extra.weight", "zzz"):
        assert key in str(err) and key in str(reference.value)
    assert_same_state(model.state_dict(), before)  # like transformers, nothing was loaded


def test_a_shape_mismatch_is_a_runtime_error_in_both_even_when_not_strict(tmp_path):
    state = dict(seeded_mlp(0).state_dict())
    state["fc2.weight"] = torch.zeros(3, 9)
    write_index(tmp_path, {"weight_map": write_shards(state, tmp_path, 2)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        hf_load_sharded_checkpoint(seeded_mlp(4), tmp_path, strict=False)
    with pytest.raises(RuntimeError, match="different shape") as info:
        bigmodel.load_sharded_checkpoint(seeded_mlp(4), tmp_path, strict=False)
    assert isinstance(info.value, bigmodel.LoadStateDictError)
    assert info.value.mismatched_keys == ["fc2.weight"]


def test_the_parameters_are_the_ones_transformers_takes():

    theirs = inspect.signature(hf_load_sharded_checkpoint).parameters
    ours = inspect.signature(bigmodel.load_sharded_checkpoint).parameters
    assert list(ours)[: len(theirs)] == list(theirs) == ["model", "folder", "strict", "prefer_safe"]
    for name in ("strict", "prefer_safe"):
        assert ours[name].default == theirs[name].default
        assert ours[name].kind == theirs[name].kind


LAYOUTS = {
    # name: which files are in the folder (each filled from its own model)
    "both indexes": ("safe-index", "bin-index"),
    "bin index and a single safetensors file": ("bin-index", "safe-single"),
    "safetensors index and a single bin file": ("safe-index", "bin-single"),
    "bin index only": ("bin-index",),
}


def _write_layout(folder: Path, parts: tuple[str, ...]) -> dict[str, Mlp]:
    models = {part: seeded_mlp(10 + i) for i, part in enumerate(parts)}
    for part, model in models.items():
        state = model.state_dict()
        if part == "safe-index":
            write_index(folder, {"weight_map": write_shards(state, folder, 2)})
        elif part == "bin-index":
            weight_map = write_shards(state, folder, 2, safe=False)
            write_index(folder, {"weight_map": weight_map}, BIN_INDEX)
        elif part == "safe-single":
            save_file(dict(state), folder / "model.safetensors", metadata={"format": "pt"})
        else:
            torch.save(dict(state), folder / "pytorch_model.bin")
    return models


@pytest.mark.parametrize("prefer_safe", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_files_read_are_the_ones_transformers_picks(tmp_path, layout, prefer_safe):
    models = _write_layout(tmp_path, LAYOUTS[layout])
    theirs, ours = seeded_mlp(4), seeded_mlp(4)
    hf_load_sharded_checkpoint(theirs, tmp_path, prefer_safe=prefer_safe)
    report = bigmodel.load_sharded_checkpoint(ours, tmp_path, prefer_safe=prefer_safe)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    picked = [m for m in models.values() if torch.equal(m.fc1.weight, ours.fc1.weight)]
    assert len(picked) == 1
    assert Path(report.checkpoint).name.endswith(".index.json")


def test_a_folder_without_an_index_still_loads_its_single_file(tmp_path):
    # transformers raises ValueError here; bigmodel's drop-in accepts the single-file layout.
    original = seeded_mlp(0)
    save_file(dict(original.state_dict()), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="Can't find a checkpoint index"):
        hf_load_sharded_checkpoint(seeded_mlp(4), tmp_path)
    model = seeded_mlp(4)
    assert tuple(bigmodel.load_sharded_checkpoint(model, tmp_path)) == ([], [])
    assert_same_state(model.state_dict(), original.state_dict())
