"""save_checkpoint(background=True): staging, handle states, errors, bounds, exit with a save in flight."""

import errno
import subprocess
import sys
import threading
import traceback

import pytest
import torch

import bigmodel
import bigmodel.api.save as save_module
import bigmodel.execution.writing as writing
from bigmodel.execution import background
from conftest import TiedNet, assert_same_state, is_same_state


def _loaded(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Gate:
    """Holds the worker inside write_planned until released (the test decides when it writes)."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        self.release = threading.Event()
        real = save_module.write_planned

        def gated(*args, **kwargs):
            self.entered.set()
            assert self.release.wait(30), "the test never released the worker"
            return real(*args, **kwargs)

        monkeypatch.setattr(save_module, "write_planned", gated)


def test_a_background_save_writes_the_same_files_as_a_synchronous_save(tmp_path, tied_net):
    state = dict(tied_net.state_dict())
    state["transposed"] = torch.randn(8, 6).t()  # non-contiguous: staged as a contiguous copy
    for kwargs in ({}, {"dtype": "bf16"}, {"max_shard_size": "1KB"}):
        sync = bigmodel.save_checkpoint(state, tmp_path / "sync", **kwargs)
        handle = bigmodel.save_checkpoint(state, tmp_path / "bg", background=True, **kwargs)
        assert isinstance(handle, bigmodel.SaveHandle)
        assert handle.staged()
        assert handle.wait() == sync.__class__(**{**sync.__dict__, "directory": tmp_path / "bg"})
        assert handle.done()
        assert _files(tmp_path / "bg") == _files(tmp_path / "sync"), kwargs


def test_tied_tensors_are_staged_once_and_a_smaller_cast_is_applied_while_staging(tmp_path):
    net = TiedNet(vocab=64, hidden=64)
    bigmodel.save_checkpoint(net, tmp_path / "a", background=True).wait()
    slots, used = background.Staging.layout(net.state_dict(), None)
    assert slots["head.weight"] is slots["embed.weight"]
    assert used < sum(t.nbytes for t in net.state_dict().values())
    _, half = background.Staging.layout(net.state_dict(), torch.bfloat16)
    assert half < used  # fp32 -> bf16 stages bf16: staging holds what is written


def test_weights_changed_right_after_save_returns_are_saved_as_they_were_at_the_call(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate = Gate(monkeypatch)
    handle = bigmodel.save_checkpoint(model, tmp_path / "ck", background=True)
    assert handle.staged() and not handle.done()
    assert gate.entered.wait(30)
    with torch.no_grad():  # the training loop's next step, while the worker has not written
        for p in model.parameters():
            p.add_(1.0)
    gate.release.set()
    handle.wait(timeout=60)
    assert_same_state(_loaded(tmp_path / "ck"), before)


def test_wait_with_a_timeout_raises_timeout_error_and_the_save_continues(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    handle = bigmodel.save_checkpoint(TiedNet(), tmp_path / "ck", background=True)
    with pytest.raises(TimeoutError, match="still running"):
        handle.wait(timeout=0.01)
    assert not handle.done()
    gate.release.set()
    assert handle.wait(timeout=60).files == ["model.safetensors"]


def test_the_worker_error_is_reraised_by_wait_with_its_type_and_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    handle = bigmodel.save_checkpoint(TiedNet(), blocker, background=True)
    with pytest.raises(NotADirectoryError, match="is a file") as info:
        handle.wait(timeout=60)
    assert handle.done() and isinstance(handle.exception(), NotADirectoryError)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "prepare_directory" in frames  # the worker's own frames
    assert any("background save into" in note for note in info.value.__notes__)


def test_a_failed_background_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    old, new = TiedNet(), TiedNet()
    with torch.no_grad():
        new.embed.weight.add_(1)
    bigmodel.save_checkpoint(old, tmp_path / "ck")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writing, "write_safetensors", full_disk)
    handle = bigmodel.save_checkpoint(new, tmp_path / "ck", background=True)
    with pytest.raises(bigmodel.CheckpointWriteError, match="previous checkpoint"):
        handle.wait(timeout=60)
    assert is_same_state(_loaded(tmp_path / "ck"), old.state_dict())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors"]


def test_a_new_background_save_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    first = bigmodel.save_checkpoint(TiedNet(), tmp_path / "one", background=True)
    returned = []
    second = threading.Thread(
        target=lambda: returned.append(
            bigmodel.save_checkpoint(TiedNet(), tmp_path / "two", background=True)
        )
    )
    second.start()
    second.join(0.3)
    assert second.is_alive() and not returned  # blocked: one save in flight
    gate.release.set()
    second.join(60)
    assert returned and first.done()
    returned[0].wait(60)


def test_staging_memory_is_reused_between_saves_and_its_bound_blocks_a_larger_state(tmp_path):
    background.release_staging_memory()
    net = TiedNet(vocab=64, hidden=64)
    _, used = background.Staging.layout(net.state_dict(), None)
    for i in range(3):
        bigmodel.save_checkpoint(net, tmp_path / f"s{i}", background=True).wait()
    assert background._STAGING.capacity == used  # one buffer, one copy of the state
    bigmodel.release_staging_memory()  # public: a loop done with saving gets the memory back
    assert background._STAGING.capacity == 0
    with pytest.warns(UserWarning, match="written synchronously"):
        handle = bigmodel.save_checkpoint(
            net, tmp_path / "big", background=True, staging_memory=used - 1
        )
    assert handle.done() and handle.staged()
    assert is_same_state(_loaded(tmp_path / "big"), net.state_dict())


EXIT_SCRIPT = """
import sys, torch, bigmodel
state = {f"w{i}": torch.full((512, 512), float(i)) for i in range(16)}
handle = bigmodel.save_checkpoint(state, sys.argv[1], background=True, max_shard_size="2MB")
assert not handle.done()
sys.exit(0)  # the save is in flight: the interpreter finishes it before exiting
"""


def test_a_process_that_exits_with_a_save_in_flight_finishes_it(tmp_path):
    folder = tmp_path / "ck"
    subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(folder)], check=True, timeout=120)
    state = _loaded(folder)
    assert sorted(state) == sorted(f"w{i}" for i in range(16))
    assert all(bool((state[f"w{i}"] == i).all()) for i in range(16))
