"""The read pipeline: parallel preads scheduled by bytes in flight, mmap read-ahead, io= choice."""

import os
import time

import pytest
import torch

import bigmodel
import bigmodel.storage.pread as pread_module
from bigmodel.storage.pread import ByteRange, filesystem_type, pick_io, pread_tensors
from conftest import TiedNet, assert_same_state


def _mixed_state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 33, generator=g),
        "b.half": torch.randn(17, 5, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(11, dtype=torch.int64),
        "d.mask": torch.rand(3, 7, generator=g) > 0.5,
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_pread_loads_exactly_what_mmap_loads(tmp_path, dtype):
    torch.manual_seed(0)
    bigmodel.save_checkpoint(TiedNet(), tmp_path, max_shard_size="2KB")
    loaded = {}
    for io in ("mmap", "pread"):
        with bigmodel.init_empty_weights():
            model = TiedNet()
        report = bigmodel.load_checkpoint(
            model, tmp_path, io=bigmodel.IOOptions(io, inflight_bytes="1KB"), dtype=dtype
        )
        loaded[io] = model.state_dict()
        assert model.head.weight is model.embed.weight
        assert report.bytes_read > 0
    assert_same_state(loaded["pread"], loaded["mmap"])


def _ranges(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return [ckpt.byte_range(k) for k in ckpt.keys()]


def test_pread_yields_every_dtype_and_shape_in_order_with_many_small_chunks(tmp_path):
    state = _mixed_state()
    bigmodel.save_checkpoint(state, tmp_path)
    ranges = _ranges(tmp_path)
    got = list(pread_tensors(ranges, chunk_bytes=64, threads=8))
    assert [k for k, _ in got] == [r.key for r in ranges]
    assert_same_state(dict(got), state)


@pytest.mark.parametrize(("bound", "ahead"), [(1, 0), (10**9, None)])
def test_reads_ahead_stay_within_the_bytes_in_flight_bound(tmp_path, monkeypatch, bound, ahead):
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(6)}  # 1 KB each
    bigmodel.save_checkpoint(state, tmp_path)
    ranges = sorted(_ranges(tmp_path), key=lambda r: r.begin)
    issued = []
    real = pread_module._read_chunk

    def recording(fd, view, offset, where):
        issued.append(offset)
        if offset == ranges[0].begin:
            time.sleep(0.2)  # the first read is slow: the other thread may read ahead meanwhile
        real(fd, view, offset, where)

    monkeypatch.setattr(pread_module, "_read_chunk", recording)
    seen_when_held = []
    for i, (_, tensor) in enumerate(pread_tensors(ranges, max_inflight_bytes=bound, threads=2)):
        started = {r.key for r in ranges if any(r.begin <= o < r.begin + r.nbytes for o in issued)}
        seen_when_held.append(len(started) - (i + 1))  # tensors read beyond the one held
        assert float(tensor[0]) == float(ranges[i].key[1:])
    if ahead == 0:
        assert seen_when_held == [0] * 6
    else:
        assert seen_when_held[0] >= 1  # the second thread read ahead while the first waited


def test_a_file_truncated_after_it_was_opened_is_a_clear_error_not_garbage(tmp_path):
    bigmodel.save_checkpoint({"w": torch.randn(1000)}, tmp_path)
    (r,) = _ranges(tmp_path)
    with open(r.path, "r+b") as f:
        f.truncate(r.begin + 100)
    with pytest.raises(bigmodel.InvalidCheckpointError, match=r"\[truncated\]"):
        list(pread_tensors([r]))


def test_io_auto_maps_local_files_and_rejects_unknown_modes(tmp_path):
    assert filesystem_type(tmp_path) not in ("", "nfs")
    assert filesystem_type(__import__("pathlib").Path("/proc/self")) == "proc"
    assert pick_io("auto", tmp_path) == "mmap"
    assert pick_io("pread", tmp_path) == "pread"
    with pytest.raises(ValueError, match="choose one of"):
        pick_io("fast", tmp_path)


def test_network_filesystems_are_told_by_mount_type_where_statfs_says_nothing(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(pread_module, "filesystem_magic", lambda path: None)
    for kind, network in (("nfs4", True), ("fuse.s3fs", True), ("ext4", False), ("", False)):
        monkeypatch.setattr(pread_module, "filesystem_type", lambda path, k=kind: k)
        assert pread_module.is_network_filesystem(tmp_path) is network, kind
        assert pick_io("auto", tmp_path) == "mmap"  # the mapping everywhere, zero copy


def test_prefetch_advises_the_kernel_about_exactly_the_tensors_asked_for(tmp_path):
    bigmodel.save_checkpoint(_mixed_state(), tmp_path)
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.readahead(["a.weight"]) == 64 * 33 * 4
        assert ckpt.readahead(["f.empty"]) == 0
        both = ckpt.readahead(["a.weight", "b.half", "a.weight"])  # repeats and neighbours merge
        assert both == 64 * 33 * 4 + 17 * 5 * 2
        assert isinstance(ckpt.byte_range("c.ids"), ByteRange)


def test_bin_checkpoints_have_no_byte_ranges_and_load_through_the_mapping(tmp_path):
    state = _mixed_state()
    bigmodel.save_checkpoint(state, tmp_path, safe_serialization=False)
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.byte_range("a.weight") is None
    assert os.path.exists(tmp_path / "pytorch_model.bin")
