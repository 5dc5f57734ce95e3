"""Re-saving into a folder that holds a checkpoint: only the new one remains, and a save that
dies at any step boundary leaves the folder loading exactly the old or exactly the new weights."""

import contextlib
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import bigmodel
from bigmodel.storage import commit as _commit
from conftest import assert_same_state


def _state(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.weight": torch.randn(10, 10, generator=g) for i in range(n)
    }  # 400 bytes each


OLD, NEW, NEWEST = _state(1), _state(2), _state(3)

LAYOUTS = {
    "single": {"max_shard_size": "1GB"},
    "3 shards": {"max_shard_size": 800},
    "2 shards": {"max_shard_size": 1200},
    "6 shards": {"max_shard_size": 400},
    "single bin": {"max_shard_size": "1GB", "safe_serialization": False},
    "3 bin shards": {"max_shard_size": 800, "safe_serialization": False},
}

TRANSITIONS = [
    ("3 shards", "3 shards"),  # same names: the old shards must survive until the commit
    ("6 shards", "2 shards"),  # many -> fewer
    ("2 shards", "6 shards"),
    ("single", "3 shards"),
    ("3 shards", "single"),
    ("single", "single"),
    ("single bin", "3 shards"),
    ("3 bin shards", "single"),
    ("3 shards", "3 bin shards"),
    ("single", "single bin"),
]


def _loaded(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}


def _loaded_like_transformers(folder):
    """transformers' discovery: model.safetensors, then the safetensors index, then the .bin pair."""
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            out = {}
            for shard in dict.fromkeys(weight_map.values()):
                if shard.endswith(".safetensors"):
                    out.update(load_file(folder / shard))
                else:
                    out.update(torch.load(folder / shard, weights_only=True))
            return out
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def _is_exactly(state, expected):
    try:
        assert_same_state(state, expected)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize(("old", "new"), TRANSITIONS, ids=[f"{a} -> {b}" for a, b in TRANSITIONS])
def test_a_resave_leaves_exactly_the_new_checkpoint_and_other_files_alone(tmp_path, old, new):
    bigmodel.save_checkpoint(OLD, tmp_path, **LAYOUTS[old])
    (tmp_path / "config.json").write_text("{}")
    result = bigmodel.save_checkpoint(NEW, tmp_path, **LAYOUTS[new])
    expected = (
        set(result.files) | ({result.index_file} if result.index_file else set()) | {"config.json"}
    )
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert_same_state(_loaded(tmp_path), NEW)
    assert_same_state(_loaded_like_transformers(tmp_path), NEW)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the save's own cleanup."""


def _kill_after(monkeypatch, steps):
    """Make the `steps`-th filesystem mutation of the commit (rename, link, unlink) never happen."""
    count = {"n": 0}

    def wrap(fn):
        def inner(*args, **kwargs):
            if count["n"] == steps:
                raise _Killed
            count["n"] += 1
            return fn(*args, **kwargs)

        return inner

    for name in ("replace", "link", "unlink"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(_commit.Commit, "abort", lambda self: None)
    return count


@pytest.mark.parametrize(("old", "new"), TRANSITIONS, ids=[f"{a} -> {b}" for a, b in TRANSITIONS])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint_never_a_mixture(
    tmp_path, monkeypatch, old, new
):
    # First count the steps of an uninterrupted save, then kill a fresh save at each of them.
    probe = tmp_path / "probe"
    bigmodel.save_checkpoint(OLD, probe, **LAYOUTS[old])
    with monkeypatch.context() as m:
        counter = _kill_after(m, steps=10**9)
        bigmodel.save_checkpoint(NEW, probe, **LAYOUTS[new])
        total = counter["n"]
    assert total > 0
    outcomes = set()
    for step in range(total + 1):
        folder = tmp_path / f"kill-{step}"
        bigmodel.save_checkpoint(OLD, folder, **LAYOUTS[old])
        with monkeypatch.context() as m:
            _kill_after(m, steps=step)
            with contextlib.suppress(_Killed):
                bigmodel.save_checkpoint(NEW, folder, **LAYOUTS[new])
        for reader in (_loaded, _loaded_like_transformers):
            state = reader(folder)
            is_old, is_new = _is_exactly(state, OLD), _is_exactly(state, NEW)
            assert is_old or is_new, (
                f"killed at step {step}/{total}: {reader.__name__} sees a mixture"
            )
            outcomes.add("new" if is_new else "old")
        # The next save cleans every leftover.
        result = bigmodel.save_checkpoint(NEWEST, folder, **LAYOUTS[new])
        expected = set(result.files) | ({result.index_file} if result.index_file else set())
        assert {p.name for p in folder.iterdir()} == expected, (
            f"leftovers after a save killed at step {step}"
        )
        assert_same_state(_loaded(folder), NEWEST)
    assert outcomes == {"old", "new"}


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_an_os_error_during_a_save_raises_a_typed_error_and_keeps_the_old_checkpoint(
    tmp_path, monkeypatch, failing
):
    bigmodel.save_checkpoint(OLD, tmp_path, max_shard_size=800)
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(bigmodel.storage.safetensors, "write_all", boom)
    elif failing == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(bigmodel.CheckpointWriteError, match="No space left") as info:
        bigmodel.save_checkpoint(NEW, tmp_path, max_shard_size=800)
    assert info.value.errno == errno.ENOSPC
    assert "previous checkpoint" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "stray files were left behind"
    assert_same_state(_loaded(tmp_path), OLD)
