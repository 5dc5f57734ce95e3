"""The flat index accelerate's ``load_checkpoint_in_model`` reads (``{tensor: shard file}``, no
``weight_map``) loads, under every rule a Hugging Face index obeys; accelerate is the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.utils import load_checkpoint_in_model

import bigmodel
from _layouts import BIN_INDEX, SAFE_INDEX, Mlp, invalid, seeded_mlp, write_index, write_shards
from bigmodel.foundations.errors import MAX_PROBLEMS
from conftest import assert_same_state


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_flat_index_written_by_hand_loads_and_accelerate_loads_the_same_tensors(tmp_path, safe):
    original = seeded_mlp(0)
    weight_map = write_shards(original.state_dict(), tmp_path, 3, safe=safe)
    write_index(tmp_path, weight_map, SAFE_INDEX if safe else BIN_INDEX)

    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.is_sharded
        assert ckpt.format == ("safetensors" if safe else "bin")
        assert ckpt.keys() == list(weight_map)
        assert ckpt.metadata == {}
        assert sorted(ckpt.files) == sorted(set(weight_map.values()))
    ours = seeded_mlp(1)
    report = bigmodel.load_checkpoint(ours, tmp_path)
    assert report.missing_keys == report.unexpected_keys == []

    theirs = seeded_mlp(2)
    load_checkpoint_in_model(theirs, str(tmp_path), strict=True)
    assert_same_state(ours.state_dict(), original.state_dict())
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_a_flat_index_loads_through_every_entry_point(tmp_path):
    original = seeded_mlp(0)
    write_index(tmp_path, write_shards(original.state_dict(), tmp_path, 2))
    for target in (tmp_path, tmp_path / SAFE_INDEX):
        model = seeded_mlp(3)
        missing, unexpected = bigmodel.load_sharded_checkpoint(model, target)
        assert (missing, unexpected) == ([], [])
        assert_same_state(model.state_dict(), original.state_dict())
    model = bigmodel.from_pretrained(Mlp, tmp_path)
    assert_same_state(model.state_dict(), original.state_dict())


def _flat(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return tmp_path, write_shards(seeded_mlp(0).state_dict(), tmp_path, 3)


def test_a_flat_index_that_repeats_a_key_is_refused_like_a_weight_map_that_does(tmp_path):
    folder, weight_map = _flat(tmp_path)
    entries = [f'"{k}": "{v}"' for k, v in weight_map.items()]
    entries.append(f'"fc1.weight": "{weight_map["fc1.weight"]}"')
    write_index(folder, "{" + ", ".join(entries) + "}")
    err = invalid(folder)
    assert [(p.code, p.key) for p in err.problems] == [("duplicate-key", "fc1.weight")]


@pytest.mark.parametrize(
    ("shard", "code"),
    [
        ("../outside.safetensors", "unsafe-shard-name"),
        ("/etc/passwd.safetensors", "unsafe-shard-name"),
        ("weights.bin", "unsafe-shard-name"),
        ("model-00009-of-00009.safetensors", "missing-shard"),
    ],
)
def test_a_flat_index_obeys_every_shard_name_rule(tmp_path, shard, code):
    folder, weight_map = _flat(tmp_path)
    weight_map["fc1.weight"] = shard
    write_index(folder, weight_map)
    assert (code, "fc1.weight") in [(p.code, p.key) for p in invalid(folder).problems]


def test_a_flat_index_is_cross_checked_against_the_shard_headers(tmp_path):
    folder, weight_map = _flat(tmp_path)
    del weight_map["fc1.bias"]
    weight_map["ghost.weight"] = weight_map["fc1.weight"]
    write_index(folder, weight_map)
    found = {(p.code, p.key) for p in invalid(folder).problems}
    assert found == {
        ("shard-key-not-in-index", "fc1.bias"),
        ("index-key-not-in-shard", "ghost.weight"),
    }


def test_the_problems_of_a_huge_flat_index_are_bounded(tmp_path):
    folder, weight_map = _flat(tmp_path)
    weight_map.update({f"ghost.{i}": weight_map["fc1.weight"] for i in range(5000)})
    write_index(folder, weight_map)
    err = invalid(folder)
    assert len(err.problems) == MAX_PROBLEMS
    assert err.total == 5000


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{}", id="empty object"),
        pytest.param('{"fc1.weight": "model-00001-of-00003.safetensors", "n": 3}', id="a number"),
        pytest.param('{"fc1.weight": "model-00001-of-00003.safetensors", "x": null}', id="null"),
        pytest.param('{"metadata": {}, "fc1.weight": "x.safetensors"}', id="metadata only"),
        pytest.param('{"weight_map": "x.safetensors"}', id="weight_map a string"),
        pytest.param('["fc1.weight", "x.safetensors"]', id="array"),
    ],
)
def test_an_object_that_is_neither_index_layout_is_refused_with_one_clear_error(tmp_path, text):
    folder, _ = _flat(tmp_path)
    write_index(folder, text)
    err = invalid(folder)
    assert err.code == "index-no-weight-map"
    assert len(err.problems) == 1
    assert '"weight_map" object, or a flat JSON object' in str(err)
