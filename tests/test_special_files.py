"""Special files never hang or exhaust memory, and unreadable files raise typed errors.

Every file bigmodel reads is opened without blocking and must be a regular file, checked on
the open descriptor: a FIFO would block ``open()`` forever, ``/dev/zero`` would be read forever.
"""

import errno
import os
import threading

import pytest

import bigmodel
from conftest import TiedNet


def _within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it has not returned."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize(
    "name", ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"]
)
def test_a_fifo_given_as_a_checkpoint_file_is_refused_at_once(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(bigmodel.InvalidCheckpointError, match="FIFO") as info:
        _within(10, lambda: bigmodel.open_checkpoint(fifo))
    assert info.value.code == "not-a-regular-file"
    assert str(fifo) in str(info.value)


def test_an_index_that_is_a_link_to_dev_zero_is_refused_without_reading_it(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.symlink_to("/dev/zero")
    with pytest.raises(bigmodel.InvalidCheckpointError, match="character device") as info:
        _within(10, lambda: bigmodel.open_checkpoint(index))
    assert info.value.code == "not-a-regular-file"
    assert "-8 bytes" not in str(info.value)


def test_a_shard_that_is_a_link_to_dev_zero_is_refused(tmp_path):
    bigmodel.save_checkpoint(TiedNet(), tmp_path, max_shard_size="1KB")
    shard = sorted(tmp_path.glob("model-00001-of-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(bigmodel.InvalidCheckpointError, match="character device"):
        _within(10, lambda: bigmodel.open_checkpoint(tmp_path))


def test_a_save_into_a_folder_whose_index_is_a_fifo_neither_hangs_nor_keeps_it(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    _within(20, lambda: bigmodel.save_checkpoint(TiedNet(), tmp_path, max_shard_size="1KB"))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        assert "embed.weight" in ckpt


def test_a_config_json_that_is_a_fifo_is_refused(tmp_path):
    class Net(bigmodel.PretrainedMixin, TiedNet):
        def __init__(self, config=None):
            super().__init__()
            self.config = {"vocab": 32}

    Net().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(bigmodel.InvalidCheckpointError, match="FIFO"):
        _within(10, lambda: Net.from_pretrained(tmp_path))


def test_an_unreadable_file_raises_a_typed_permission_error(tmp_path, monkeypatch):
    # Tests run as root, which reads any file whatever its mode: make the open fail as a
    # user's would, where the open happens.
    bigmodel.save_checkpoint(TiedNet(), tmp_path)
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(bigmodel.CheckpointPermissionError, match="permission denied") as info:
        bigmodel.open_checkpoint(tmp_path)
    assert isinstance(info.value, PermissionError)
    assert "model.safetensors" in str(info.value)
