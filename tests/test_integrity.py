"""Digests recorded while saving, checked by verify; structural checks without digests."""

import fcntl
import json
import os
import random

import pytest
import torch

import bigmodel
from conftest import assert_same_state


def _state(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}


LAYOUTS = {
    "single": {},
    "sharded": {"max_shard_size": 2100},
    "bin shards": {"max_shard_size": 2100, "safe_serialization": False},
}


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_clean_checkpoint_verifies_every_file(tmp_path, layout):
    result = bigmodel.save_checkpoint(_state(), tmp_path, **LAYOUTS[layout])
    with bigmodel.open_checkpoint(tmp_path, verify=True) as ckpt:
        outcome = ckpt.verify()
        assert outcome.ok
        assert sorted(outcome.verified) == sorted(result.files)
        assert outcome.unverified == []
        assert set(ckpt.digests()) == set(result.files)


def test_sha256_digests_work_too_and_unknown_algorithms_are_refused_before_writing(tmp_path):
    bigmodel.save_checkpoint(_state(), tmp_path / "sha", digest="sha256", max_shard_size=2100)
    with bigmodel.open_checkpoint(tmp_path / "sha") as ckpt:
        assert all(d.startswith("sha256:") for d in ckpt.digests().values())
        assert ckpt.verify().ok
    with pytest.raises(ValueError, match="Unknown digest algorithm 'md4'"):
        bigmodel.save_checkpoint(_state(), tmp_path / "bad", digest="md4")
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []


def test_without_digests_verify_lists_the_files_it_could_not_check(tmp_path):
    bigmodel.save_checkpoint(_state(), tmp_path, digest=None, max_shard_size=2100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "bigmodel_digests" not in index["metadata"]
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        outcome = ckpt.verify()
    assert outcome.ok
    assert outcome.verified == []
    assert len(outcome.unverified) == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_flipped_byte_is_caught_by_the_structure_checks_or_by_verify(tmp_path, layout):
    rng = random.Random(layout)
    original = tmp_path / "original"
    result = bigmodel.save_checkpoint(_state(), original, **LAYOUTS[layout])
    for trial in range(25):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        for p in original.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        victim = folder / rng.choice(result.files)
        _flip(victim, rng.randrange(victim.stat().st_size))
        with pytest.raises(bigmodel.InvalidCheckpointError) as info:
            bigmodel.open_checkpoint(folder, verify=True)
        assert victim.name in str(info.value), str(info.value)


def test_a_flipped_data_byte_is_reported_as_a_digest_mismatch_naming_the_shard(tmp_path):
    result = bigmodel.save_checkpoint(_state(), tmp_path, max_shard_size=2100)
    victim = tmp_path / result.files[1]
    _flip(victim, victim.stat().st_size - 10)
    ckpt = bigmodel.open_checkpoint(tmp_path)  # structurally fine: only the digest can tell
    outcome = ckpt.verify()
    assert [p.code for p in outcome.problems] == ["digest-mismatch"]
    assert outcome.problems[0].file.endswith(result.files[1])
    assert sorted(outcome.verified) == sorted(f for f in result.files if f != result.files[1])
    with pytest.raises(bigmodel.InvalidCheckpointError, match=r"\[digest-mismatch\]"):
        bigmodel.load_checkpoint(torch.nn.Module(), tmp_path, strict=False, verify=True)


def test_a_truncated_shard_is_caught_without_any_digest(tmp_path):
    result = bigmodel.save_checkpoint(_state(), tmp_path, max_shard_size=2100, digest=None)
    victim = tmp_path / result.files[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(bigmodel.InvalidCheckpointError, match=r"\[truncated\]") as info:
        bigmodel.open_checkpoint(tmp_path)
    assert result.files[0] in str(info.value)


def test_a_shard_copied_in_from_another_save_is_not_from_this_index(tmp_path):
    bigmodel.save_checkpoint(_state(1), tmp_path / "a", max_shard_size=2100)
    bigmodel.save_checkpoint(_state(2), tmp_path / "b", max_shard_size=2100)
    name = "model-00002-of-00003.safetensors"
    (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(
        bigmodel.InvalidCheckpointError, match=r"\[shard-not-from-this-index\]"
    ) as info:
        bigmodel.open_checkpoint(tmp_path / "a")
    assert name in str(info.value)


def test_a_second_save_into_a_folder_being_saved_is_a_clear_conflict(tmp_path):
    bigmodel.save_checkpoint(_state(1), tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running save holds
        with pytest.raises(bigmodel.CheckpointConflictError, match="Another save into"):
            bigmodel.save_checkpoint(_state(2), tmp_path)
    finally:
        os.close(fd)
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert_same_state({k: ckpt.get_tensor(k) for k in ckpt.keys()}, _state(1))
    bigmodel.save_checkpoint(_state(2), tmp_path)  # the lock is free again
