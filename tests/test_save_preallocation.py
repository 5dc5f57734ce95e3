"""Shards are preallocated to their final size and written in chunks, hashed as they go;
every guarantee of a save holds whatever ``fallocate`` answers."""

import ctypes
import errno
import os

import pytest
import torch
from safetensors.torch import load_file

import bigmodel
import bigmodel.storage.atomic as atomic
import bigmodel.storage.safetensors as st_format
from conftest import assert_same_state

OLD = {f"old{i}.weight": torch.full((20, 10), float(i)) for i in range(4)}  # 800 bytes each
NEW = {f"new{i}.weight": torch.arange(200, dtype=torch.float32) + i for i in range(4)}


def _load(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        assert ckpt.verify().problems == []
        return {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}


def _failing_fallocate(code):
    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(code)
        return -1

    return lambda: fallocate


def test_each_shard_is_preallocated_to_exactly_its_final_size(tmp_path, monkeypatch):
    asked = []
    real = st_format.preallocate

    def spy(fh, size):
        asked.append((os.path.basename(fh.name), size, real(fh, size)))
        return asked[-1][2]

    monkeypatch.setattr(st_format, "preallocate", spy)
    result = bigmodel.save_checkpoint(NEW, tmp_path, max_shard_size=1700, durable=False)
    sizes = {temp.split(".bigmodel-tmp-")[0][1:]: size for temp, size, _ in asked}
    assert sizes == {name: (tmp_path / name).stat().st_size for name in result.files}
    assert len(sizes) == 2
    assert_same_state(_load(tmp_path), NEW)


def test_a_preallocated_file_keeps_the_size_of_what_was_written(tmp_path):
    path = tmp_path / "f"
    with open(path, "xb", buffering=0) as fh:
        reserved = atomic.preallocate(fh, 1 << 20)
        fh.write(b"0123456789")
    st = os.stat(path)
    assert st.st_size == 10, "a preallocation must never show as trailing bytes"
    if reserved:  # ext4, xfs, btrfs, tmpfs: the blocks are allocated up front
        assert st.st_blocks * 512 >= 1 << 20


def test_a_file_object_without_a_descriptor_is_written_without_preallocation():
    import io

    assert atomic.preallocate(io.BytesIO(), 100) is False


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSPC, errno.ENOSYS, errno.EINVAL])
def test_a_filesystem_that_refuses_preallocation_gets_the_same_checkpoint_by_plain_writes(
    tmp_path, monkeypatch, code
):
    monkeypatch.setattr(atomic, "_fallocate", _failing_fallocate(code))
    bigmodel.save_checkpoint(NEW, tmp_path, max_shard_size=1700)
    assert_same_state(_load(tmp_path), NEW)
    assert_same_state(
        load_file(tmp_path / "model-00001-of-00002.safetensors"), dict(list(NEW.items())[:2])
    )


def test_a_platform_without_fallocate_saves_by_plain_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_fallocate", lambda: None)
    bigmodel.save_checkpoint(NEW, tmp_path)
    assert_same_state(_load(tmp_path), NEW)


def test_an_io_error_from_fallocate_fails_the_save_typed_and_keeps_the_old_checkpoint(
    tmp_path, monkeypatch
):
    bigmodel.save_checkpoint(OLD, tmp_path, max_shard_size=1700)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(atomic, "_fallocate", _failing_fallocate(errno.EIO))
    with pytest.raises(bigmodel.CheckpointWriteError, match="previous checkpoint") as info:
        bigmodel.save_checkpoint(NEW, tmp_path, max_shard_size=1700)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert_same_state(_load(tmp_path), OLD)


@pytest.mark.parametrize("durable", [True, False])
def test_a_preallocated_shard_that_fails_mid_write_leaves_nothing_and_the_old_checkpoint_whole(
    tmp_path, monkeypatch, durable
):
    bigmodel.save_checkpoint(OLD, tmp_path, max_shard_size=1700)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(st_format, "WRITE_CHUNK", 256)  # several writes per tensor
    reserved = []
    real_preallocate, real_write = st_format.preallocate, st_format.write_all
    writes = {"n": 0}

    def preallocate(fh, size):
        reserved.append(real_preallocate(fh, size))
        return reserved[-1]

    def write_all(fh, data):
        writes["n"] += 1
        if writes["n"] == 4:  # the header, then the first tensor's third chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fh, data)

    monkeypatch.setattr(st_format, "preallocate", preallocate)
    monkeypatch.setattr(st_format, "write_all", write_all)
    with pytest.raises(bigmodel.CheckpointWriteError, match="No space left"):
        bigmodel.save_checkpoint(NEW, tmp_path, max_shard_size=1700, durable=durable, workers=1)
    assert reserved, "the failing shard was preallocated first"
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "stray files were left behind"
    assert_same_state(_load(tmp_path), OLD)


def test_tensors_larger_than_one_write_are_written_and_hashed_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(st_format, "WRITE_CHUNK", 100)  # not a multiple of any element size
    state = {"a": torch.randn(333), "b": torch.arange(7, dtype=torch.int16), "c": torch.ones(0)}
    calls = []
    real = st_format.write_all
    monkeypatch.setattr(st_format, "write_all", lambda fh, d: (calls.append(len(d)), real(fh, d)))
    bigmodel.save_checkpoint(state, tmp_path, durable=False)
    assert max(calls[1:-1]) == 100, "a large tensor is written in chunks"
    assert_same_state(load_file(tmp_path / "model.safetensors"), state)
    assert_same_state(_load(tmp_path), state)  # verify() re-hashes: the digest covers every chunk
