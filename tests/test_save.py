import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import bigmodel
from bigmodel.storage.safetensors import NAME_FROM_DTYPE
from conftest import TiedNet, assert_same_state, raw_bytes, same_bytes


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _state(ckpt):
    return {k: ckpt.get_tensor(k) for k in ckpt.keys()}


def test_one_shard_is_written_as_model_safetensors_without_an_index(tmp_path, tied_net):
    result = bigmodel.save_checkpoint(tied_net, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert result.files == ["model.safetensors"]
    assert result.index_file is None
    header = _header(tmp_path / "model.safetensors")
    assert header["__metadata__"]["format"] == "pt"
    assert json.loads(header["__metadata__"]["bigmodel_aliases"]) == {"head.weight": "embed.weight"}


def test_several_shards_get_hugging_face_names_and_an_exact_index(tmp_path):
    state = {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    result = bigmodel.save_checkpoint(
        state, tmp_path, max_shard_size=1000, metadata={"producer": "test"}
    )
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert result.files == names
    assert result.index_file == "model.safetensors.index.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*names, "model.safetensors.index.json"]
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["metadata"]["bigmodel_digests"]) == set(names)
    assert {k: v for k, v in index["metadata"].items() if k != "bigmodel_digests"} == {
        "total_size": 2000,
        "producer": "test",
    }
    assert list(index["weight_map"]) == list(state)
    assert index["weight_map"] == {
        "layer0.weight": names[0],
        "layer1.weight": names[0],
        "layer2.weight": names[1],
        "layer3.weight": names[1],
        "layer4.weight": names[2],
    }
    for name in names:
        meta = _header(tmp_path / name)["__metadata__"]
        assert meta.pop("bigmodel_digest") == index["metadata"]["bigmodel_digests"][name]
        assert meta == {"format": "pt", "producer": "test"}
        with safe_open(tmp_path / name, "pt") as f:
            assert f.metadata()["producer"] == "test"
    assert result.total_size == 2000


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(tmp_path):
    state = {
        "a": torch.zeros(10),
        "big": torch.zeros(1000),
        "b": torch.zeros(10),
        "c": torch.zeros(10),
    }
    bigmodel.save_checkpoint(state, tmp_path, max_shard_size="100B")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "b": "model-00003-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }


def test_legacy_bin_format_uses_pytorch_model_names(tmp_path):
    state = {f"w{i}": torch.full((10, 10), float(i)) for i in range(3)}
    result = bigmodel.save_checkpoint(state, tmp_path, max_shard_size=500, safe_serialization=False)
    assert result.files == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert result.index_file == "pytorch_model.bin.index.json"
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["total_size"] == 1200
    loaded = torch.load(tmp_path / result.files[1], weights_only=True)
    assert torch.equal(loaded["w1"], state["w1"])
    single = tmp_path / "single"
    assert bigmodel.save_checkpoint(state, single, safe_serialization=False).files == [
        "pytorch_model.bin"
    ]
    assert_same_state(_state(bigmodel.open_checkpoint(single)), state)


def test_tied_weights_are_stored_once_and_restored_as_aliases(tmp_path, tied_net):
    result = bigmodel.save_checkpoint(tied_net, tmp_path, max_shard_size=1500)
    assert result.aliases == {"head.weight": "embed.weight"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "head.weight" not in index["weight_map"]
    assert index["metadata"]["bigmodel_aliases"] == {"head.weight": "embed.weight"}
    expected_size = sum(
        t.numel() * t.element_size() for k, t in tied_net.state_dict().items() if k != "head.weight"
    )
    assert index["metadata"]["total_size"] == expected_size
    ckpt = bigmodel.open_checkpoint(tmp_path)
    assert ckpt.tensor_info("head.weight").alias_of == "embed.weight"
    assert_same_state(_state(ckpt), tied_net.state_dict())
    with torch.device("meta"):
        fresh = TiedNet()
    bigmodel.load_sharded_checkpoint(fresh, tmp_path)
    assert fresh.head.weight is fresh.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(ids), tied_net(ids))


def test_non_contiguous_and_partially_overlapping_tensors_are_saved_as_their_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "rows": base[1:3], "cols": base[:, ::2], "whole": base}
    result = bigmodel.save_checkpoint(state, tmp_path)
    assert result.aliases == {}
    assert_same_state(
        _state(bigmodel.open_checkpoint(tmp_path)), {k: v.contiguous() for k, v in state.items()}
    )


def test_the_same_tensor_under_two_names_in_a_state_dict_is_an_alias(tmp_path):
    w = torch.randn(3, 3)
    result = bigmodel.save_checkpoint({"a": w, "b": w, "c": w.view(9)}, tmp_path)
    assert result.aliases == {"b": "a"}
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), {"a": w, "b": w, "c": w.view(9)})


@pytest.mark.parametrize("safe", [True, False])
def test_a_conjugate_or_negative_view_is_saved_as_its_values_never_as_an_alias(tmp_path, safe):
    x = torch.randn(5, dtype=torch.complex64)
    state = {"a": x, "b": x.conj(), "re": x.real, "im_of_conj": x.conj().imag}
    assert state["b"].is_conj() and state["im_of_conj"].is_neg()
    result = bigmodel.save_checkpoint(state, tmp_path, safe_serialization=safe)
    assert result.aliases == {}
    expected = {k: v.resolve_conj().resolve_neg() for k, v in state.items()}
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), expected)


def test_a_lone_conjugate_view_is_written_as_its_values(tmp_path):
    x = torch.randn(3, 2, dtype=torch.complex64)
    bigmodel.save_checkpoint({"b": x.conj()}, tmp_path)
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), {"b": x.conj().resolve_conj()})


def test_the_same_conjugate_view_under_two_names_is_still_one_tied_tensor(tmp_path):
    x = torch.randn(4, dtype=torch.complex64).conj()
    result = bigmodel.save_checkpoint({"a": x, "b": x}, tmp_path)
    assert result.aliases == {"b": "a"}
    assert_same_state(
        _state(bigmodel.open_checkpoint(tmp_path)),
        {"a": x.resolve_conj(), "b": x.resolve_conj()},
    )


_DTYPES = sorted(NAME_FROM_DTYPE, key=str)


def _random_tensor(draw, dtype, shape):
    numel = 1
    for d in shape:
        numel *= d
    data = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)


@st.composite
def state_dicts(draw):
    count = draw(st.integers(min_value=1, max_value=6))
    names = draw(
        st.lists(st.text(min_size=1, max_size=12), min_size=count, max_size=count, unique=True)
    )
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3)))
        out[name] = _random_tensor(draw, dtype, shape)
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=state_dicts(), shard_size=st.integers(min_value=0, max_value=200), safe=st.booleans())
def test_every_supported_dtype_and_shape_round_trips_bit_for_bit(
    tmp_path_factory, state, shard_size, safe
):
    folder = tmp_path_factory.mktemp("roundtrip")
    if not safe:
        state = {
            k: v
            for k, v in state.items()
            if v.dtype
            in {
                torch.bool,
                torch.uint8,
                torch.int8,
                torch.int16,
                torch.int32,
                torch.int64,
                torch.float16,
                torch.bfloat16,
                torch.float32,
                torch.float64,
                torch.complex64,
            }
        }
        if not state:
            return
    result = bigmodel.save_checkpoint(
        state, folder, max_shard_size=shard_size, safe_serialization=safe
    )
    ckpt = bigmodel.open_checkpoint(folder)
    assert_same_state(_state(ckpt), state)
    assert result.total_size == sum(t.numel() * t.element_size() for t in state.values())
    if safe:
        for name in result.files:
            with safe_open(folder / name, "pt") as f:
                for key in f.keys():
                    assert same_bytes(raw_bytes(f.get_tensor(key)), raw_bytes(state[key])), key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.empty(2, device="meta"), "meta device"),
        (torch.zeros(2, dtype=torch.complex128), "safetensors cannot store"),
        (torch.eye(3).to_sparse(), "only dense tensors"),
        ([1, 2], "not a tensor"),
    ],
)
def test_tensors_that_cannot_be_saved_are_rejected_by_name_before_anything_is_written(
    tmp_path, value, message
):
    with pytest.raises(bigmodel.UnsupportedTensorError, match=message) as info:
        bigmodel.save_checkpoint({"good": torch.zeros(2), "bad.one": value}, tmp_path)
    assert "'bad.one'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("digest", ["xxh3_128", None])
@pytest.mark.parametrize(
    ("name", "rule"), [("__metadata__", "reserves for the file's metadata"), ("x\ud800", "UTF-8")]
)
def test_a_tensor_name_the_format_cannot_hold_is_refused_and_the_old_checkpoint_stays(
    tmp_path, name, rule, digest
):
    old = {"w": torch.arange(4.0)}
    bigmodel.save_checkpoint(old, tmp_path)
    with pytest.raises(bigmodel.UnsupportedTensorError, match=rule) as info:
        bigmodel.save_checkpoint(
            {name: torch.zeros(2), "w": torch.ones(4)}, tmp_path, digest=digest
        )
    assert repr(name) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), old)


def test_the_safetensors_writer_itself_refuses_a_reserved_name(tmp_path):
    from bigmodel.storage.safetensors import header_bytes

    with pytest.raises(bigmodel.UnsupportedTensorError, match="__metadata__"):
        header_bytes([("__metadata__", torch.zeros(1))], {"format": "pt"})


def test_metadata_must_be_strings_and_must_not_use_reserved_keys(tmp_path):
    with pytest.raises(TypeError, match="strings"):
        bigmodel.save_checkpoint({"a": torch.zeros(1)}, tmp_path, metadata={"n": 1})
    with pytest.raises(ValueError, match="format"):
        bigmodel.save_checkpoint({"a": torch.zeros(1)}, tmp_path, metadata={"format": "np"})


def test_saving_into_a_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        bigmodel.save_checkpoint({"a": torch.zeros(1)}, target)


def test_a_scratch_save_without_fsync_is_still_a_complete_checkpoint(tmp_path, tied_net):
    bigmodel.save_checkpoint(tied_net, tmp_path, durable=False, max_shard_size=1000)
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), tied_net.state_dict())


@pytest.mark.parametrize("safe", [True, False])
def test_a_save_can_cast_floating_point_tensors_as_it_writes(tmp_path, tied_net, safe):
    result = bigmodel.save_checkpoint(
        tied_net, tmp_path, dtype=torch.bfloat16, max_shard_size=800, safe_serialization=safe
    )
    ckpt = bigmodel.open_checkpoint(tmp_path)
    assert ckpt.tensor_info("embed.weight").dtype == torch.bfloat16
    assert torch.equal(
        ckpt.get_tensor("embed.weight"), tied_net.embed.weight.detach().to(torch.bfloat16)
    )
    assert ckpt.get_tensor("step").dtype == torch.int64
    stored = {k: v for k, v in tied_net.state_dict().items() if not (safe and k == "head.weight")}
    expected = sum(
        v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in stored.values()
    )
    assert result.total_size == expected
    assert tied_net.embed.weight.dtype == torch.float32  # the model itself is untouched
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        bigmodel.save_checkpoint(tied_net, tmp_path / "x", dtype=torch.int8)


def test_shards_written_in_parallel_are_byte_identical_to_a_sequential_save(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(64, 64, generator=g) for i in range(12)}
    one = bigmodel.save_checkpoint(state, tmp_path / "one", max_shard_size="40KB", workers=1)
    four = bigmodel.save_checkpoint(state, tmp_path / "four", max_shard_size="40KB", workers=4)
    assert one.files == four.files and len(one.files) > 4
    for name in [*one.files, one.index_file]:
        assert same_bytes(
            (tmp_path / "one" / name).read_bytes(), (tmp_path / "four" / name).read_bytes()
        ), name
    with pytest.raises(ValueError, match="at least one thread"):
        bigmodel.save_checkpoint(state, tmp_path / "none", workers=0)


def _small_file_limits(monkeypatch, *, tensors: int, header: int) -> None:
    """Lower the per-file limits the writer plans with and the reader enforces, together (the
    real ones take seconds to reach: see the ``slow`` tests at the real limits)."""
    import bigmodel.checkpoint.sharding as sharding
    import bigmodel.storage.safetensors as safetensors_module

    for module in (sharding, safetensors_module):
        monkeypatch.setattr(module, "MAX_TENSORS", tensors)
        monkeypatch.setattr(module, "MAX_HEADER_SIZE", header)


def _split_by_count(tmp_path, limit: int) -> None:
    state = {f"t{i}": torch.full((1,), float(i)) for i in range(limit + 1)}
    result = bigmodel.save_checkpoint(state, tmp_path, max_shard_size="10GB")
    assert len(result.files) == 2
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt) == limit + 1
        assert max(len(keys) for keys in ckpt.keys_by_file().values()) <= limit
        assert ckpt.get_tensor(f"t{limit}").item() == limit


def test_more_tensors_than_one_file_may_hold_are_split_so_the_reader_accepts_them(
    tmp_path, monkeypatch
):
    _small_file_limits(monkeypatch, tensors=500, header=10**6)
    _split_by_count(tmp_path, 500)


@pytest.mark.slow
def test_more_tensors_than_one_file_may_hold_at_the_real_limit_are_split(tmp_path):
    from bigmodel.storage.safetensors import MAX_TENSORS

    _split_by_count(tmp_path, MAX_TENSORS)


def _split_by_header(tmp_path, limit: int) -> None:
    long = {c * (limit * 6 // 10): torch.zeros(1) for c in "ab"}
    result = bigmodel.save_checkpoint(long, tmp_path / "two", max_shard_size="10GB")
    assert len(result.files) == 2
    with bigmodel.open_checkpoint(tmp_path / "two") as ckpt:
        assert sorted(ckpt.keys()) == sorted(long)
    bigmodel.save_checkpoint({"w": torch.ones(2)}, tmp_path / "one")
    huge = {"x" * limit: torch.zeros(1)}
    with pytest.raises(bigmodel.UnsupportedTensorError, match="bytes of file header"):
        bigmodel.save_checkpoint(huge, tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["model.safetensors"]


def test_names_too_long_for_one_header_are_split_and_one_too_long_for_any_is_refused(
    tmp_path, monkeypatch
):
    _small_file_limits(monkeypatch, tensors=100_000, header=10**6)
    _split_by_header(tmp_path, 10**6)


@pytest.mark.slow
def test_names_too_long_for_one_header_at_the_real_limit_are_split_or_refused(tmp_path):
    from bigmodel.storage.safetensors import MAX_HEADER_SIZE

    _split_by_header(tmp_path, MAX_HEADER_SIZE)


def _refused_index(tmp_path, limit: int) -> None:
    bigmodel.save_checkpoint({"w": torch.ones(2)}, tmp_path)
    # each name fits a shard header on its own; together they overflow the index
    state = {c * (limit // 5): torch.zeros(1) for c in "abcdef"}
    with pytest.raises(bigmodel.UnsupportedTensorError, match="index of this checkpoint"):
        bigmodel.save_checkpoint(state, tmp_path, max_shard_size="10GB")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_save_whose_index_the_reader_would_refuse_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    import bigmodel.checkpoint.index as index_module
    import bigmodel.checkpoint.naming as naming

    _small_file_limits(monkeypatch, tensors=100_000, header=10**6)
    for module in (index_module, naming):
        monkeypatch.setattr(module, "MAX_INDEX_SIZE", 2 * 10**6)
    _refused_index(tmp_path, 2 * 10**6)


@pytest.mark.slow
def test_a_save_whose_index_would_pass_the_real_limit_is_refused_before_anything_is_written(
    tmp_path,
):
    from bigmodel.checkpoint.index import MAX_INDEX_SIZE

    _refused_index(tmp_path, MAX_INDEX_SIZE)


def _nested():
    return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize(
    ("make", "rule", "safe"),
    [
        (_nested, "nested tensor", True),
        (_nested, "nested tensor", False),
        (lambda: torch.zeros(4, dtype=torch.uint8).view(torch.uint4), "below a byte", True),
        (lambda: torch.zeros(4, dtype=torch.uint8).view(torch.uint4), "below a byte", False),
        (lambda: torch.empty(2**62, 2, 0), "below 2\\*\\*63", True),  # .bin stores any torch shape
    ],
)
def test_a_tensor_the_format_cannot_store_is_refused_by_name_with_the_rule(
    tmp_path, make, rule, safe
):
    with pytest.raises(bigmodel.UnsupportedTensorError, match=rule) as info:
        bigmodel.save_checkpoint({"bad.one": make()}, tmp_path, safe_serialization=safe)
    assert "'bad.one'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_view_of_a_tensor_as_another_dtype_is_saved_as_its_own_values_in_a_bin(tmp_path):
    x = torch.randn(4)
    state = {"a": x, "b": x.view(torch.int32)}
    bigmodel.save_checkpoint(state, tmp_path, safe_serialization=False)
    assert_same_state(_state(bigmodel.open_checkpoint(tmp_path)), state)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermissionError(13, "Permission denied"), bigmodel.CheckpointPermissionError),
        (OSError(30, "Read-only file system"), bigmodel.CheckpointWriteError),
    ],
)
def test_a_folder_that_cannot_be_created_is_a_typed_error(tmp_path, monkeypatch, error, expected):
    # Tests run as root, which may write anywhere: fail the mkdir as a user's would.
    def refuse(path, *args, **kwargs):
        raise error

    monkeypatch.setattr("os.mkdir", refuse)
    with pytest.raises(expected, match="Cannot create the folder") as info:
        bigmodel.save_checkpoint({"w": torch.ones(2)}, tmp_path / "sub" / "dir")
    assert "sub/dir" in str(info.value)


_NAMES = ["w", "__metadata__", "lone\ud800", "esc\x1b[2J", "a.b", ""]


@st.composite
def hostile_entries(draw):
    base = torch.randn(4, 3, dtype=draw(st.sampled_from([torch.float32, torch.complex64])))
    make = draw(
        st.sampled_from(
            [
                lambda: base,
                lambda: base.conj(),
                lambda: base.t(),
                lambda: base[1:3],
                lambda: base.real if base.is_complex() else -base,
                lambda: base.conj().imag if base.is_complex() else base,
                lambda: base.view(torch.int32) if not base.is_complex() else base,
                lambda: torch.empty(2, device="meta"),
                lambda: torch.eye(2).to_sparse(),
            ]
        )
    )
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3, unique=True))
    return {name: make() if i == 0 else base for i, name in enumerate(names)}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=hostile_entries(), safe=st.booleans())
def test_any_state_dict_round_trips_exactly_or_is_refused_before_anything_is_written(
    tmp_path_factory, state, safe
):
    folder = tmp_path_factory.mktemp("hostile")
    previous = {"old": torch.arange(3.0)}
    bigmodel.save_checkpoint(previous, folder)
    refused = ""
    try:
        bigmodel.save_checkpoint(state, folder, safe_serialization=safe)
    except bigmodel.UnsupportedTensorError as exc:
        refused = str(exc)
    if refused:
        assert any(repr(name) in refused for name in state), refused
        assert_same_state(_state(bigmodel.open_checkpoint(folder)), previous)
        return
    expected = {k: v.resolve_conj().resolve_neg().contiguous() for k, v in state.items()}
    assert_same_state(_state(bigmodel.open_checkpoint(folder)), expected)
