"""Malformed and hostile checkpoints are refused with a typed error naming the file, rule and tensor.

Every bad file here is built by hand: raw safetensors bytes (8-byte little-endian header
length, JSON header, data), index files edited as JSON text, and pickles carrying a
code-execution payload. Each test checks the exception type, the stable rule code, and that
the message names the file (and the tensor where one is involved) and says how to fix it.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shlex
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

import bigmodel
from bigmodel import (
    BigModelError,
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from bigmodel.storage import safetensors as st_format

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
BIN_SHARDS = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
LOOKED_FOR = [SAFE_INDEX, SAFE_NAME, BIN_INDEX, BIN_NAME]


# -- helpers --------------------------------------------------------------------------------
def header_bytes(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: ``header`` (dict/list JSON, str or raw bytes) padded to 8, then ``data``."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape: list[int], begin: int) -> dict[str, Any]:
    nbytes = 4
    for dim in shape:
        nbytes *= dim
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + nbytes]}


def valid_state() -> dict[str, torch.Tensor]:
    return {
        "a": torch.zeros(16),
        "b": torch.ones(16),
        "c": torch.arange(16, dtype=torch.float32),
    }


#: A valid two-tensor file from the reference writer, corrupted below.
VALID = safetensors_bytes({"layer.0.weight": torch.ones(2, 3), "layer.0.bias": torch.zeros(3)})
(VALID_HEADER_LEN,) = struct.unpack("<Q", VALID[:8])


def expect_invalid(
    path: Path,
    code: str,
    *,
    file: str,
    key: str | None = None,
    error: type[InvalidCheckpointError] = InvalidCheckpointError,
) -> InvalidCheckpointError:
    """Open ``path``; assert one problem-rich error whose first problem is ``code`` in ``file``."""
    with pytest.raises(error) as info:
        bigmodel.open_checkpoint(path)
    err = info.value
    assert isinstance(err, BigModelError)
    assert isinstance(err, ValueError)
    assert err.code == code, str(err)
    problem = err.problems[0]
    assert problem.code == code
    assert Path(problem.file).name == file, problem
    assert problem.key == key, problem
    assert problem.hint, problem
    text = str(err)
    assert f"[{code}]" in text
    assert file in text
    assert "Fix:" in text
    if key is not None:
        assert repr(key) in text
    return err


def codes(err: InvalidCheckpointError) -> list[str]:
    return [p.code for p in err.problems]


def sharded(tmp_path: Path, *, safe: bool = True) -> Path:
    """A valid three-shard checkpoint (a, b, c one per shard) in ``tmp_path / 'ckpt'``."""
    directory = tmp_path / "ckpt"
    bigmodel.save_checkpoint(
        valid_state(), directory, max_shard_size=64, safe_serialization=safe, durable=False
    )
    assert sorted(os.listdir(directory)) == sorted(
        [SAFE_INDEX, *SHARDS] if safe else [BIN_INDEX, *BIN_SHARDS]
    )
    return directory


def read_index(directory: Path, name: str = SAFE_INDEX) -> dict[str, Any]:
    return json.loads((directory / name).read_text())


def write_index(directory: Path, index: Any, name: str = SAFE_INDEX) -> Path:
    path = directory / name
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    return path


# -- the control ----------------------------------------------------------------------------
def test_valid_single_and_sharded_checkpoints_of_both_formats_still_open(tmp_path):
    state = valid_state()
    save_file(state, tmp_path / SAFE_NAME, metadata={"format": "pt"})
    torch.save(state, tmp_path / BIN_NAME)
    cases = [
        tmp_path / SAFE_NAME,
        tmp_path / BIN_NAME,
        sharded(tmp_path / "s"),
        sharded(tmp_path / "b", safe=False),
        sharded(tmp_path / "i") / SAFE_INDEX,
    ]
    for path in cases:
        with bigmodel.open_checkpoint(path) as ckpt:
            assert sorted(ckpt.keys()) == ["a", "b", "c"], path
            for name, tensor in state.items():
                assert torch.equal(ckpt.get_tensor(name), tensor), (path, name)


def test_a_hand_built_header_with_metadata_and_an_empty_tensor_opens(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "w": f32([2], 0),
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
    }
    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(header, struct.pack("<2f", 1.5, -2.0)))
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.get_tensor("w").tolist() == [1.5, -2.0]
        assert ckpt.get_tensor("empty").shape == (0, 3)
        assert ckpt.metadata == {"format": "pt"}


# -- safetensors headers --------------------------------------------------------------------
TOO_LARGE = st_format.MAX_HEADER_SIZE + 1

HEADER_CASES: list[tuple[str, bytes, str, str | None]] = [
    # id, file bytes, code, key
    ("empty file", b"", "header-too-short", None),
    ("three bytes", b"\x01\x02\x03", "header-too-short", None),
    ("seven bytes", b"\x08" + b"\x00" * 6, "header-too-short", None),
    ("length past end", header_bytes({"w": f32([1], 0)}, b"\0" * 4, length=4096), "header-past-eof", None),
    ("length one past end", header_bytes("{}", length=9), "header-past-eof", None),
    ("valid file cut in its header", VALID[: 8 + VALID_HEADER_LEN // 2], "header-past-eof", None),
    ("length just over 100MB", header_bytes("{}", length=TOO_LARGE), "header-too-large", None),
    ("length 2**64-1", header_bytes("{}", length=2**64 - 1), "header-too-large", None),
    ("lone continuation byte", header_bytes(b'{"\x80": 1}'), "header-not-utf8", None),
    ("latin-1 tensor name", header_bytes(b'{"caf\xe9": {}}'), "header-not-utf8", None),
    ("utf-16", header_bytes("{}".encode("utf-16")), "header-not-utf8", None),
    ("plain text", header_bytes("not json at all"), "header-not-json", None),
    ("zero-length header", header_bytes(b"", length=0), "header-not-json", None),
    ("truncated object", header_bytes('{"w": {"dtype": "F32"'), "header-not-json", None),
    ("NUL padding", header_bytes(b"{}" + b"\0" * 6), "header-not-json", None),
    ("NaN literal", header_bytes('{"w": NaN'), "header-not-json", None),
    ("deep nesting", header_bytes("[" * 100_000), "header-not-json", None),
    ("array", header_bytes([{"w": f32([1], 0)}], b"\0" * 4), "header-not-object", None),
    ("number", header_bytes("42"), "header-not-object", None),
    ("string", header_bytes('"model"'), "header-not-object", None),
    ("null", header_bytes("null"), "header-not-object", None),
    (
        "duplicated tensor name",
        header_bytes(
            '{"layer.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            ' "layer.w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            b"\0" * 8,
        ),
        "duplicate-tensor",
        "layer.w",
    ),
    ("unknown dtype F128", header_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16), "unknown-dtype", "w"),
    ("torch dtype spelling", header_bytes({"w": {"dtype": "float32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown-dtype", "w"),
    ("lowercase dtype", header_bytes({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown-dtype", "w"),
    ("empty dtype", header_bytes({"w": {"dtype": "", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown-dtype", "w"),
    ("sub-byte F4", header_bytes({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"), "unsupported-dtype", "w"),
    ("sub-byte F6_E2M3", header_bytes({"w": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3), "unsupported-dtype", "w"),
    ("sub-byte F6_E3M2", header_bytes({"w": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3), "unsupported-dtype", "w"),
    ("gap between tensors", header_bytes({"x": f32([1], 0), "y": f32([1], 8)}, b"\0" * 12), "bad-offsets", "y"),
    ("gap before the first tensor", header_bytes({"x": f32([1], 4)}, b"\0" * 8), "bad-offsets", "x"),
    ("overlapping tensors", header_bytes({"x": f32([2], 0), "y": f32([2], 4)}, b"\0" * 12), "bad-offsets", "y"),
    ("two tensors on the same bytes", header_bytes({"x": f32([1], 0), "y": f32([1], 0)}, b"\0" * 4), "bad-offsets", "y"),
    ("end before begin", header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8), "bad-offsets", "w"),
    ("shape larger than span", header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "size-mismatch", "w"),
    ("shape smaller than span", header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "size-mismatch", "w"),
    ("dtype width ignored", header_bytes({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "size-mismatch", "w"),
    ("astronomical shape", header_bytes({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4), "size-mismatch", "w"),
    ("a dimension of 2**63 with no elements", header_bytes({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}), "bad-entry", "w"),
    ("dimensions whose product overflows, with no elements", header_bytes({"w": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}), "bad-entry", "w"),
    ("a name with a lone surrogate", header_bytes('{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "bad-name", "w\ud800"),
    ("a tensor named like the metadata's key is the metadata", header_bytes({"__metadata__": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad-metadata", None),
    ("trailing bytes after the data", VALID + b"\0" * 8, "trailing-bytes", None),
    ("one trailing byte", header_bytes({"w": f32([1], 0)}, b"\0" * 5), "trailing-bytes", None),
    ("no data at all", header_bytes({"w": f32([4], 0)}), "truncated", None),
    ("last byte cut", VALID[:-1], "truncated", None),
    ("half the data cut", VALID[: len(VALID) - 6], "truncated", None),
    ("metadata value not a string", header_bytes({"__metadata__": {"step": 1}}), "bad-metadata", None),
    ("metadata nested object", header_bytes({"__metadata__": {"a": {"b": "c"}}}), "bad-metadata", None),
    ("metadata is a list", header_bytes({"__metadata__": ["format", "pt"]}), "bad-metadata", None),
    ("metadata is a string", header_bytes({"__metadata__": "pt"}), "bad-metadata", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "code", "key"),
    [pytest.param(d, c, k, id=i) for i, d, c, k in HEADER_CASES],
)
def test_a_malformed_safetensors_file_is_refused_with_its_rule_code(tmp_path, data, code, key):
    path = tmp_path / SAFE_NAME
    path.write_bytes(data)
    err = expect_invalid(path, code, file=SAFE_NAME, key=key)
    assert len(err.problems) == 1, str(err)


def test_safetensors_own_reader_accepts_the_duplicated_name_that_bigmodel_refuses(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "dup.safetensors"
    path.write_bytes(
        header_bytes(
            '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            ' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
        )
    )
    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["w"]
    expect_invalid(path, "duplicate-tensor", file="dup.safetensors", key="w")


BAD_ENTRIES: list[tuple[str, Any]] = [
    ("entry is a list", ["F32", [1], [0, 4]]),
    ("entry is a string", "F32"),
    ("entry is null", None),
    ("dtype missing", {"shape": [1], "data_offsets": [0, 4]}),
    ("dtype is a number", {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}),
    ("dtype is null", {"dtype": None, "shape": [1], "data_offsets": [0, 4]}),
    ("shape missing", {"dtype": "F32", "data_offsets": [0, 4]}),
    ("shape is a number", {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}),
    ("shape is a string", {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}),
    ("shape negative", {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}),
    ("shape float", {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}),
    ("shape bool", {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}),
    ("shape nested", {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}),
    ("offsets missing", {"dtype": "F32", "shape": [1]}),
    ("offsets one number", {"dtype": "F32", "shape": [1], "data_offsets": [4]}),
    ("offsets three numbers", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}),
    ("offsets negative", {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}),
    ("offsets strings", {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}),
    ("offsets floats", {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}),
    ("offsets bools", {"dtype": "F32", "shape": [1], "data_offsets": [False, True]}),
    ("offsets an object", {"dtype": "F32", "shape": [1], "data_offsets": {"begin": 0}}),
]


@pytest.mark.parametrize("entry", [pytest.param(e, id=i) for i, e in BAD_ENTRIES])
def test_a_header_entry_missing_or_mistyping_a_field_is_a_bad_entry(tmp_path, entry):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(header_bytes({"encoder.w": entry}, b"\0" * 4))
    expect_invalid(path, "bad-entry", file="weights.safetensors", key="encoder.w")


def test_every_problem_in_one_header_is_reported_in_one_error(tmp_path):
    header = {
        "__metadata__": {"step": 7},
        "a": {"dtype": "F32", "shape": "2"},
        "b": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]},
        "c": {"dtype": "F4", "shape": [2], "data_offsets": [4, 5]},
        "d": {"dtype": "F32", "shape": [3], "data_offsets": [5, 9]},
        "e": f32([1], 9),
    }
    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(header, b"\0" * 13))
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(tmp_path)
    err = info.value
    found = [(p.code, p.key) for p in err.problems]
    assert found == [
        ("bad-metadata", None),
        ("bad-entry", "a"),
        ("unknown-dtype", "b"),
        ("unsupported-dtype", "c"),
        ("size-mismatch", "d"),
    ]
    text = str(err)
    assert text.startswith("5 problems found")
    for code, key in found:
        assert f"[{code}]" in text
        if key is not None:
            assert f"tensor {key!r}" in text
    assert all(Path(p.file).name == SAFE_NAME for p in err.problems)


# -- index files ----------------------------------------------------------------------------
INDEX_TEXT_CASES: list[tuple[str, bytes, str]] = [
    ("not json", b"{weight_map: nope", "index-not-json"),
    ("empty", b"", "index-not-json"),
    ("not utf-8", b'{"weight_map": {"a": "\xff.safetensors"}}', "index-not-json"),
    ("deep nesting", b"[" * 100_000, "index-not-json"),
    ("empty object", b"{}", "index-no-weight-map"),
    ("array", b'[{"weight_map": {}}]', "index-no-weight-map"),
    ("weight_map null", b'{"weight_map": null}', "index-no-weight-map"),
    ("weight_map a list", b'{"weight_map": [["a", "x.safetensors"]]}', "index-no-weight-map"),
    ("weight_map a string", b'{"weight_map": "x.safetensors"}', "index-no-weight-map"),
    ("metadata a list", b'{"metadata": [], "weight_map": {}}', "index-bad-metadata"),
]


@pytest.mark.parametrize(
    ("text", "code"), [pytest.param(t, c, id=i) for i, t, c in INDEX_TEXT_CASES]
)
def test_an_index_that_is_not_a_json_weight_map_is_refused(tmp_path, text, code):
    directory = sharded(tmp_path)
    (directory / SAFE_INDEX).write_bytes(text)
    expect_invalid(directory, code, file=SAFE_INDEX)


@pytest.mark.parametrize("value", [3, None, ["model-00001-of-00003.safetensors"], {"f": "x"}, True])
def test_a_weight_map_value_that_is_not_a_string_is_refused(tmp_path, value):
    directory = sharded(tmp_path)
    index = read_index(directory)
    index["weight_map"]["b"] = value
    write_index(directory, index)
    expect_invalid(directory, "index-bad-value", file=SAFE_INDEX, key="b")


def _plant(target: Path, tensor_name: str = "a") -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.endswith(".bin"):
        torch.save({tensor_name: torch.zeros(16)}, target)
    else:
        save_file({tensor_name: torch.zeros(16)}, target)


UNSAFE_SHARDS: list[tuple[str, str]] = [
    # id, shard name ({outside} is the absolute path of a valid file outside the folder)
    ("parent directory", "../outside.safetensors"),
    ("deep parent directory", "../../../../../../../../..{outside}"),
    ("absolute path", "{outside}"),
    ("backslash parent", "..\\outside.safetensors"),
    ("backslash subfolder", "sub\\x.safetensors"),
    ("subdirectory", "sub/x.safetensors"),
    ("dot subdirectory", "./model-00001-of-00003.safetensors"),
    ("drive letter", "C:x.safetensors"),
    ("dot dot", ".."),
    ("empty name", ""),
    ("NUL byte", "model-00001-of-00003.safetensors\x00.txt"),
    ("a .bin shard in a safetensors index", "a.bin"),
    ("a .pt shard in a safetensors index", "a.pt"),
    ("the index itself", SAFE_INDEX),
]


@pytest.mark.parametrize("shard", [pytest.param(s, id=i) for i, s in UNSAFE_SHARDS])
def test_an_unsafe_shard_name_is_refused_without_opening_anything_outside_the_folder(
    tmp_path, monkeypatch, shard
):
    directory = sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    _plant(outside)
    shard = shard.format(outside=outside)
    if shard and "\x00" not in shard and shard != "..":
        target = directory / shard
        if not target.exists():
            _plant(target)  # a valid file at the escaped path must not make the name acceptable
    index = read_index(directory)
    index["weight_map"]["a"] = shard
    write_index(directory, index)

    opened: list[Path] = []
    real_read_header = st_format.read_header
    real_load_bin = bigmodel.storage.torch_bin.load_bin

    def spy_read_header(path, *args, **kwargs):
        opened.append(Path(path))
        return real_read_header(path, *args, **kwargs)

    def spy_load_bin(path):
        opened.append(Path(path))
        return real_load_bin(path)

    monkeypatch.setattr(st_format, "read_header", spy_read_header)
    monkeypatch.setattr(bigmodel.storage.torch_bin, "load_bin", spy_load_bin)

    err = expect_invalid(directory, "unsafe-shard-name", file=SAFE_INDEX, key="a")
    assert codes(err) == ["unsafe-shard-name"]
    assert repr(shard) in str(err)
    assert sorted(p.name for p in opened) == SHARDS[1:]
    assert all(p.parent == directory for p in opened), opened


def test_a_safetensors_shard_named_in_a_bin_index_is_refused(tmp_path):
    directory = sharded(tmp_path, safe=False)
    _plant(directory / "a.safetensors")
    index = read_index(directory, BIN_INDEX)
    index["weight_map"]["a"] = "a.safetensors"
    write_index(directory, index, BIN_INDEX)
    expect_invalid(directory, "unsafe-shard-name", file=BIN_INDEX, key="a")


def test_a_shard_missing_from_the_folder_is_reported_with_its_name(tmp_path):
    directory = sharded(tmp_path)
    (directory / SHARDS[1]).unlink()
    err = expect_invalid(directory, "missing-shard", file=SAFE_INDEX, key="b")
    assert codes(err) == ["missing-shard"]
    assert SHARDS[1] in str(err)


def test_a_shard_that_is_a_directory_is_named_as_not_a_regular_file(tmp_path):
    directory = sharded(tmp_path)
    (directory / SHARDS[1]).unlink()
    (directory / SHARDS[1]).mkdir()
    err = expect_invalid(directory, "not-a-regular-file", file=SAFE_INDEX, key="b")
    assert "a directory" in str(err)


def test_a_key_stored_in_two_shards_is_a_duplicate_key(tmp_path):
    directory = sharded(tmp_path)
    save_file({"a": torch.ones(16), "b": torch.ones(16)}, directory / SHARDS[1])
    err = expect_invalid(directory, "duplicate-key", file=SAFE_INDEX, key="a")
    assert codes(err) == ["duplicate-key"]
    assert SHARDS[0] in str(err)
    assert SHARDS[1] in str(err)


def test_a_key_listed_twice_in_the_index_json_is_a_duplicate_key(tmp_path):
    directory = sharded(tmp_path)
    text = (
        '{"metadata": {"total_size": 192}, "weight_map": {'
        f'"a": "{SHARDS[0]}", "b": "{SHARDS[1]}", "c": "{SHARDS[2]}", "a": "{SHARDS[0]}"'
        "}}"
    )
    write_index(directory, text)
    err = expect_invalid(directory, "duplicate-key", file=SAFE_INDEX, key="a")
    assert codes(err) == ["duplicate-key"]


def test_an_index_key_absent_from_its_shard_header_is_reported(tmp_path):
    directory = sharded(tmp_path)
    index = read_index(directory)
    index["weight_map"]["decoder.ghost"] = SHARDS[2]
    write_index(directory, index)
    err = expect_invalid(directory, "index-key-not-in-shard", file=SAFE_INDEX, key="decoder.ghost")
    assert codes(err) == ["index-key-not-in-shard"]
    assert SHARDS[2] in str(err)


def test_a_shard_tensor_the_index_does_not_list_is_reported_against_the_shard(tmp_path):
    directory = sharded(tmp_path)
    save_file({"a": torch.zeros(16), "stowaway": torch.zeros(2)}, directory / SHARDS[0])
    err = expect_invalid(directory, "shard-key-not-in-index", file=SHARDS[0], key="stowaway")
    assert codes(err) == ["shard-key-not-in-index"]


def test_a_shard_tensor_the_index_places_in_another_shard_is_reported_twice(tmp_path):
    directory = sharded(tmp_path)
    save_file({"a": torch.zeros(16), "c": torch.zeros(16)}, directory / SHARDS[0])
    (directory / SHARDS[2]).unlink()
    save_file({"x": torch.zeros(1)}, directory / SHARDS[2])
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(directory)
    found = sorted((p.code, p.key, Path(p.file).name) for p in info.value.problems)
    assert found == [
        ("index-key-not-in-shard", "c", SAFE_INDEX),
        ("shard-key-not-in-index", "c", SHARDS[0]),
        ("shard-key-not-in-index", "x", SHARDS[2]),
    ]


BAD_ALIASES: list[tuple[str, Any, str | None]] = [
    ("not a map", ["tied.weight", "a"], None),
    ("a number", 3, None),
    ("non-string target", {"tied.weight": 1}, None),
    ("invalid JSON string", "{tied.weight: a}", None),
    ("alias also stored", {"b": "a"}, "b"),
    ("alias of a missing tensor", {"tied.weight": "ghost"}, "tied.weight"),
    ("alias of an alias", {"t1": "a", "t2": "t1"}, "t2"),
]


@pytest.mark.parametrize(("aliases", "key"), [pytest.param(a, k, id=i) for i, a, k in BAD_ALIASES])
def test_a_bad_alias_entry_in_the_index_metadata_is_refused(tmp_path, aliases, key):
    directory = sharded(tmp_path)
    index = read_index(directory)
    index["metadata"]["bigmodel_aliases"] = aliases
    write_index(directory, index)
    err = expect_invalid(directory, "bad-alias", file=SAFE_INDEX, key=key)
    assert codes(err) == ["bad-alias"]


@pytest.mark.parametrize(("aliases", "key"), [pytest.param(a, k, id=i) for i, a, k in BAD_ALIASES])
def test_a_bad_alias_entry_in_a_single_file_metadata_is_refused(tmp_path, aliases, key):
    stored = {"a": torch.zeros(2), "b": torch.ones(2)}
    raw = aliases if isinstance(aliases, str) else json.dumps(aliases)
    save_file(stored, tmp_path / SAFE_NAME, metadata={"bigmodel_aliases": raw})
    err = expect_invalid(tmp_path / SAFE_NAME, "bad-alias", file=SAFE_NAME, key=key)
    assert codes(err) == ["bad-alias"]


def test_an_index_with_many_shard_problems_reports_them_all_at_once(tmp_path):
    directory = sharded(tmp_path)
    (directory / SHARDS[1]).unlink()  # b: missing shard
    (directory / SHARDS[2]).write_bytes(header_bytes("not json"))  # c: corrupt shard
    save_file({"a": torch.zeros(16), "stowaway": torch.zeros(1)}, directory / SHARDS[0])
    index = read_index(directory)
    index["weight_map"]["ghost"] = SHARDS[0]
    index["weight_map"]["escape"] = "../outside.safetensors"
    index["metadata"]["bigmodel_aliases"] = {"tied": "nowhere"}
    write_index(directory, index)
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(directory)
    err = info.value
    found = sorted((p.code, p.key, Path(p.file).name) for p in err.problems)
    assert found == [
        ("bad-alias", "tied", SAFE_INDEX),
        ("header-not-json", None, SHARDS[2]),
        ("index-key-not-in-shard", "ghost", SAFE_INDEX),
        ("missing-shard", "b", SAFE_INDEX),
        ("shard-key-not-in-index", "stowaway", SHARDS[0]),
        ("unsafe-shard-name", "escape", SAFE_INDEX),
    ]
    assert str(err).startswith("6 problems found")


def test_an_index_with_json_level_and_shard_level_problems_reports_them_all_at_once(tmp_path):
    directory = sharded(tmp_path)
    (directory / SHARDS[1]).unlink()
    text = (
        '{"metadata": {}, "weight_map": {'
        f'"a": "{SHARDS[0]}", "b": "{SHARDS[1]}", "c": "{SHARDS[2]}",'
        f' "a": "{SHARDS[0]}", "bad": 7, "escape": "../outside.safetensors"'
        "}}"
    )
    write_index(directory, text)
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(directory)
    found = sorted((p.code, p.key) for p in info.value.problems)
    assert found == [
        ("duplicate-key", "a"),
        ("index-bad-value", "bad"),
        ("missing-shard", "b"),
        ("unsafe-shard-name", "escape"),
    ]


def test_an_index_above_the_size_limit_is_refused_before_it_is_read(tmp_path):
    directory = sharded(tmp_path)
    with open(directory / SAFE_INDEX, "r+b") as fh:
        fh.truncate(bigmodel.checkpoint.index.MAX_INDEX_SIZE + 1)  # sparse: nothing is written
    expect_invalid(directory, "index-too-large", file=SAFE_INDEX)


# -- pickled .bin files ---------------------------------------------------------------------
class RunsCommand:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def payloads(marker: Path) -> dict[str, RunsCommand]:
    return {
        "os.system": RunsCommand(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": RunsCommand(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": RunsCommand(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


def test_the_payloads_really_execute_when_unpickled_without_protection(tmp_path):
    marker = tmp_path / "pwned"
    for name, payload in payloads(marker).items():
        pickle.loads(pickle.dumps(payload))
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("placement", ["whole file", "state dict value", "nested in a list"])
def test_a_bin_with_a_code_execution_payload_is_unsafe_and_never_runs(tmp_path, payload, placement):
    marker = tmp_path / "pwned"
    evil = payloads(marker)[payload]
    obj = {
        "whole file": evil,
        "state dict value": {"w": torch.zeros(2), "x": evil},
        "nested in a list": {"w": [torch.zeros(2), evil]},
    }[placement]
    torch.save(obj, tmp_path / BIN_NAME)
    err = expect_invalid(tmp_path, "unsafe-pickle", file=BIN_NAME, error=UnsafeCheckpointError)
    assert "weights_only" in str(err)
    assert not marker.exists()


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
            id="legacy torch.save",
        ),
        pytest.param(lambda obj, path: path.write_bytes(pickle.dumps(obj)), id="bare pickle"),
    ],
)
def test_a_non_zip_bin_with_a_code_execution_payload_is_refused_and_never_runs(tmp_path, write):
    marker = tmp_path / "pwned"
    write({"w": payloads(marker)["os.system"]}, tmp_path / BIN_NAME)
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(tmp_path)
    # Either rule is acceptable: torch refuses to mmap a non-zip file before unpickling it.
    assert info.value.code in {"legacy-bin-format", "unsafe-pickle"}
    assert BIN_NAME in str(info.value)
    assert not marker.exists()


def test_a_hostile_shard_in_a_sharded_bin_checkpoint_is_still_an_unsafe_checkpoint_error(tmp_path):
    directory = sharded(tmp_path, safe=False)
    marker = tmp_path / "pwned"
    torch.save({"b": payloads(marker)["os.system"]}, directory / BIN_SHARDS[1])
    err = expect_invalid(
        directory, "unsafe-pickle", file=BIN_SHARDS[1], error=UnsafeCheckpointError
    )
    assert codes(err) == ["unsafe-pickle"]
    assert not marker.exists()


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda n: n // 2, id="first half"),
        pytest.param(lambda n: 64, id="first 64 bytes"),
        pytest.param(lambda n: n - 1, id="last byte cut"),
        pytest.param(lambda n: n - 30, id="end record cut"),
    ],
)
def test_a_truncated_bin_is_unreadable(tmp_path, cut):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(256, dtype=torch.float32)}, good)
    data = good.read_bytes()
    (tmp_path / BIN_NAME).write_bytes(data[: cut(len(data))])
    err = expect_invalid(tmp_path / BIN_NAME, "unreadable-bin", file=BIN_NAME)
    assert codes(err) == ["unreadable-bin"]


def test_an_empty_bin_is_unreadable_not_a_legacy_format(tmp_path):
    (tmp_path / BIN_NAME).write_bytes(b"")
    expect_invalid(tmp_path, "unreadable-bin", file=BIN_NAME)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param([torch.zeros(2)], id="list"),
        pytest.param((torch.zeros(2),), id="tuple"),
        pytest.param(torch.zeros(2), id="bare tensor"),
        pytest.param(3, id="int"),
        pytest.param({"w": 1.0}, id="non-tensor value"),
        pytest.param({"w": {"inner": torch.zeros(2)}}, id="nested dict"),
        pytest.param({1: torch.zeros(2)}, id="int key"),
    ],
)
def test_a_bin_that_is_not_a_flat_state_dict_is_bad_content(tmp_path, obj):
    torch.save(obj, tmp_path / BIN_NAME)
    expect_invalid(tmp_path, "bad-bin-content", file=BIN_NAME)


def test_a_legacy_non_zip_torch_save_file_is_a_legacy_format(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / BIN_NAME, _use_new_zipfile_serialization=False)
    err = expect_invalid(tmp_path / BIN_NAME, "legacy-bin-format", file=BIN_NAME)
    assert "torch.save" in str(err)


# -- discovery ------------------------------------------------------------------------------
def test_an_empty_folder_lists_the_names_it_looked_for(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        bigmodel.open_checkpoint(tmp_path)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert isinstance(err, BigModelError)
    assert err.code == "not-found"
    text = str(err)
    assert str(tmp_path) in text
    for name in LOOKED_FOR:
        assert name in text
    assert "Fix:" in text


def test_a_folder_with_only_oddly_named_weights_says_what_it_found(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as info:
        bigmodel.open_checkpoint(tmp_path)
    text = str(info.value)
    assert "weights.safetensors" in text
    assert "config.json" in text
    for name in LOOKED_FOR:
        assert name in text


def test_a_path_that_does_not_exist_is_not_found(tmp_path):
    missing = tmp_path / "nope" / SAFE_NAME
    with pytest.raises(CheckpointNotFoundError) as info:
        bigmodel.open_checkpoint(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.code == "not-found"
    assert str(missing) in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    "name", ["weights.npz", "model.safetensors.tmp", "model.ckpt", "README", "model.gguf"]
)
def test_a_file_with_an_unknown_extension_is_an_unknown_format(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(VALID)
    expect_invalid(path, "unknown-format", file=name)


# -- fuzzing --------------------------------------------------------------------------------
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _open_or_refuse(path: Path) -> None:
    """Either the file opens and every tensor reads, or an InvalidCheckpointError is raised."""
    refused: InvalidCheckpointError | None = None
    try:
        ckpt = bigmodel.open_checkpoint(path)
    except InvalidCheckpointError as err:
        refused = err
    if refused is not None:
        assert refused.problems
        assert all(p.hint for p in refused.problems)
        assert path.name in str(refused)
        return
    with ckpt:
        for name in ckpt.keys():
            info = ckpt.tensor_info(name)
            assert tuple(ckpt.get_tensor(name).shape) == info.shape


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    extra=st.binary(max_size=16),
)
def test_randomly_corrupted_safetensors_bytes_never_escape_as_another_exception(edits, cut, extra):
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    blob = bytes(data[:cut] if cut is not None else data) + extra
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / SAFE_NAME
        path.write_bytes(blob)
        _open_or_refuse(path)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["F32", "F16", "BF16", "U8", "F4", "X", "", "__metadata__"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "x", "__metadata__"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
ENTRIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "U8", "I64", "BOOL", "F4", "F8_E4M3"]),
            "shape": st.lists(st.integers(0, 4), max_size=3),
            "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2),
        }
    ),
)


@FUZZ_SETTINGS
@given(
    header=st.dictionaries(
        st.sampled_from(["w", "b", "__metadata__", "x.y", "lone\ud800", "esc\x1b[2J"]), ENTRIES
    ),
    data=st.binary(max_size=64),
)
def test_arbitrary_json_headers_never_escape_as_another_exception(header, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / SAFE_NAME
        path.write_bytes(header_bytes(header, data))
        _open_or_refuse(path)


def test_a_field_repeated_inside_one_entry_is_a_bad_entry_not_a_phantom_tensor(tmp_path):
    path = tmp_path / "field.safetensors"
    path.write_bytes(
        header_bytes(
            '{"w": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
        )
    )
    err = expect_invalid(path, "bad-entry", file="field.safetensors", key="w")
    assert "repeats the field(s) ['dtype']" in str(err)


def test_a_key_repeated_in_the_index_metadata_is_not_reported_as_a_tensor(tmp_path):
    folder = sharded(tmp_path)
    text = (
        (folder / SAFE_INDEX)
        .read_text()
        .replace('"metadata": {', '"metadata": {"x": "1", "x": "2", ', 1)
    )
    (folder / SAFE_INDEX).write_text(text)
    err = expect_invalid(folder, "index-bad-json", file=SAFE_INDEX)
    assert "repeats the field(s) ['x']" in str(err)


def test_a_header_with_an_absurd_number_of_tensors_is_refused_before_it_is_parsed(tmp_path):
    from bigmodel.storage.safetensors import MAX_TENSORS

    count = MAX_TENSORS + 1
    entries = ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count)
    )
    path = tmp_path / "many.safetensors"
    path.write_bytes(header_bytes("{" + entries + "}", b"\0" * count))
    err = expect_invalid(path, "too-many-tensors", file="many.safetensors")
    assert str(MAX_TENSORS) in str(err)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_SHARD_NAMES = st.sampled_from(
    [
        "s1.safetensors",
        "s2.safetensors",
        "../s1.safetensors",
        "missing.safetensors",
        "s1.bin",
        "",
        "/abs.safetensors",
        "a\\b.safetensors",
    ]
)


@FUZZ_SETTINGS
@given(
    weight_map=st.dictionaries(
        st.sampled_from(["a", "b", "c", "zz"]), _SHARD_NAMES | _JSON_VALUES, max_size=5
    ),
    metadata=_JSON_VALUES,
    extra=st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=3),
)
def test_arbitrary_index_files_never_escape_as_another_exception(
    tmp_path_factory, weight_map, metadata, extra
):
    folder = tmp_path_factory.mktemp("index")
    save_file({"a": torch.zeros(1)}, folder / "s1.safetensors", metadata={"format": "pt"})
    save_file(
        {"b": torch.zeros(1), "c": torch.zeros(2)},
        folder / "s2.safetensors",
        metadata={"format": "pt"},
    )
    (folder / SAFE_INDEX).write_text(
        json.dumps({**extra, "metadata": metadata, "weight_map": weight_map})
    )
    _open_or_refuse(folder / SAFE_INDEX)


# -- bounded validation --------------------------------------------------------------------
def _bad_entries(count: int, name_bytes: int = 8) -> bytes:
    """A header of ``count`` entries, each breaking a rule (a string where offsets belong)."""
    entry = '"{}":{{"dtype":"F32","shape":[1],"data_offsets":[0,"x"]}}'
    width = max(name_bytes, len(str(count)))
    return ("{" + ",".join(entry.format(str(i).zfill(width)) for i in range(count)) + "}").encode()


def test_a_header_breaking_a_rule_in_every_entry_keeps_a_bounded_list_of_problems(tmp_path):
    from bigmodel.foundations.errors import MAX_LISTED, MAX_PROBLEMS
    from bigmodel.storage.safetensors import MAX_TENSORS

    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(_bad_entries(MAX_TENSORS)))
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(path)
    err = info.value
    assert err.total == MAX_TENSORS
    assert len(err.problems) == MAX_PROBLEMS
    assert f"... and {MAX_TENSORS - MAX_LISTED} more" in str(err)
    assert len(str(err)) < 20_000
    assert str(err).startswith(f"{MAX_TENSORS} problems found in the checkpoint")


def test_a_header_with_more_entries_than_the_limit_is_refused_by_their_exact_count(tmp_path):
    from bigmodel.storage.safetensors import MAX_TENSORS

    # No entry names data_offsets, so the cheap pre-count sees none; the real count does.
    header = "{" + ",".join(f'"{i}":0' for i in range(MAX_TENSORS + 1)) + "}"
    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(header))
    err = expect_invalid(path, "too-many-tensors", file=SAFE_NAME)
    assert f"describes more than {MAX_TENSORS} tensors" in str(err)


def test_an_index_with_a_bad_value_under_every_key_keeps_a_bounded_list_of_problems(tmp_path):
    from bigmodel.foundations.errors import MAX_PROBLEMS

    directory = sharded(tmp_path)
    index = read_index(directory)
    index["weight_map"].update({f"extra.{i}": i for i in range(50_000)})
    write_index(directory, index)
    with pytest.raises(InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(directory)
    assert len(info.value.problems) == MAX_PROBLEMS
    assert info.value.total >= 50_000
    assert len(str(info.value)) < 20_000


HEADER_MEMORY_PROBE = """
import sys
import bigmodel
from bigmodel.foundations.memory import MemorySampler
with MemorySampler(interval=0.001) as mem:
    try:
        bigmodel.open_checkpoint(sys.argv[1])
    except bigmodel.InvalidCheckpointError as exc:
        print(exc.total, end=" ")
print(mem.increase("anon"))
"""


def _header_memory(path: Path) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", HEADER_MEMORY_PROBE, str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    return int(out[0]), int(out[1])


#: The documented bound (docs/guarantees.md): about eleven times the header, plus a fixed cost.
def _bound(header: int) -> float:
    return 12 * header + 16e6


def test_validating_a_header_with_the_most_entries_stays_within_the_documented_bound(tmp_path):
    from bigmodel.storage.safetensors import MAX_TENSORS

    raw = _bad_entries(MAX_TENSORS)  # the entry limit, each entry as small as it can be
    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(raw))
    problems, anon = _header_memory(path)
    assert problems == MAX_TENSORS
    assert anon < _bound(len(raw)), (anon, len(raw))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["longest names", "tiny entries past the count"])
def test_validating_a_hostile_header_at_the_size_limit_stays_within_the_documented_bound(
    tmp_path, kind
):
    from bigmodel.storage.safetensors import MAX_HEADER_SIZE, MAX_TENSORS

    if kind == "longest names":
        raw = _bad_entries(MAX_TENSORS, MAX_HEADER_SIZE // MAX_TENSORS - 64)
    else:  # millions of entries: refused by their count, once parsed
        raw = ("{" + ",".join(f'"{i}":0' for i in range(MAX_HEADER_SIZE // 12)) + "}").encode()
    assert len(raw) <= MAX_HEADER_SIZE
    path = tmp_path / SAFE_NAME
    path.write_bytes(header_bytes(raw))
    _, anon = _header_memory(path)
    print(f"{kind}: header {len(raw) / 1e6:.1f} MB, peak anon +{anon / 1e6:.1f} MB")
    assert anon < _bound(len(raw)), (anon, len(raw))


@FUZZ_SETTINGS
@given(count=st.integers(1, 400), extra=st.integers(0, 3))
def test_any_number_of_broken_entries_keeps_at_most_the_bounded_list_of_problems(count, extra):
    from bigmodel.foundations.errors import MAX_LISTED, MAX_PROBLEMS

    good = {f"ok{i}": f32([1], 4 * i) for i in range(extra)}
    raw = _bad_entries(count)[:-1] + ("," + json.dumps(good)[1:] if good else "}").encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / SAFE_NAME
        path.write_bytes(header_bytes(raw, b"\0" * 4 * extra))
        with pytest.raises(InvalidCheckpointError) as info:
            bigmodel.open_checkpoint(path)
    err = info.value
    assert err.total == count
    assert len(err.problems) == min(count, MAX_PROBLEMS)
    if count > 1:  # one problem is the whole message; several are listed, at most MAX_LISTED
        assert str(err).count("\n  - ") == min(count, MAX_LISTED)


SPECIAL_KINDS = ["fifo", "dev-zero", "directory", "dangling-link", "regular"]


def _make_special(path: Path, kind: str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere")


@settings(FUZZ_SETTINGS, max_examples=25)  # a broken folder is retried for a save in flight
@given(kinds=st.lists(st.sampled_from(SPECIAL_KINDS), min_size=4, max_size=4))
def test_special_files_anywhere_in_a_checkpoint_never_hang_and_raise_typed_errors(kinds):
    import threading

    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        bigmodel.save_checkpoint(valid_state(), directory, max_shard_size="100B")
        targets = [directory / SAFE_INDEX, *(directory / s for s in SHARDS)]
        for target, kind in zip(targets, kinds, strict=True):
            if kind != "regular":
                _make_special(target, kind)
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                with bigmodel.open_checkpoint(directory) as ckpt:
                    for name in ckpt.keys():
                        ckpt.get_tensor(name)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), f"open_checkpoint blocked with {kinds}"
    if all(kind == "regular" for kind in kinds):
        assert outcome == [None]
    else:
        assert isinstance(outcome[0], BigModelError), repr(outcome[0])
