"""Loads from a real FUSE mount (``bindfs``, a C passthrough): the filesystem is told from its
``statfs`` magic, the mapping is read by :data:`~bigmodel.storage.pread.NETWORK_READ`'s threads
and pieces, and the weights are the saved ones. Skipped where ``bindfs`` or ``/dev/fuse`` is
missing (``.ci/run`` installs bindfs where it can)."""

import os
import shutil
import subprocess
import time

import pytest
import torch

import bigmodel
from bigmodel.storage.page_cache import evict
from bigmodel.storage.pread import NETWORK_READ, is_network_filesystem, mapped_read_shape
from bigmodel.storage.readahead import FileMappings
from conftest import spy_populators

pytestmark = pytest.mark.skipif(
    shutil.which("bindfs") is None
    or shutil.which("fusermount") is None
    or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="needs bindfs, fusermount and a usable /dev/fuse",
)


@pytest.fixture
def fuse_mount(tmp_path):
    """(backing folder, the same folder mounted through FUSE)."""
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()
    proc = subprocess.Popen(
        ["bindfs", "-f", "--no-allow-other", str(backing), str(mount)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not os.path.ismount(mount):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"bindfs could not mount here: {proc.communicate()[1][-300:]}")
        time.sleep(0.02)
    try:
        yield backing, mount
    finally:
        subprocess.run(["fusermount", "-u", str(mount)], capture_output=True)
        proc.wait(timeout=10)


def _saved(backing):
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(256, 256) for i in range(6)}
    bigmodel.save_checkpoint(state, backing, max_shard_size="600KB")
    for path in backing.iterdir():
        evict(path)
    return state


def test_a_cold_load_from_a_fuse_mount_maps_the_files_with_the_network_read_shape(
    fuse_mount, monkeypatch
):
    backing, mount = fuse_mount
    state = _saved(backing)
    assert is_network_filesystem(mount) and not is_network_filesystem(backing)  # real statfs
    assert mapped_read_shape(mount) == NETWORK_READ
    started = spy_populators(monkeypatch)
    model = torch.nn.Module()
    for name in state:
        module, _, attr = name.partition(".")
        child = torch.nn.Module()
        child.register_parameter(attr, torch.nn.Parameter(torch.empty(256, 256, device="meta")))
        model.add_module(module, child)
    report = bigmodel.load_checkpoint(model, mount)
    assert [(k["threads"], k["chunk_bytes"]) for _, k in started] == [tuple(NETWORK_READ)]
    maps = FileMappings()
    assert all(maps.holds(p) for p in model.parameters())  # zero copy, through the mount
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert report.bytes_read == sum(t.nbytes for t in state.values())


def test_reading_a_fuse_mount_in_file_order_reads_ahead_with_the_network_read_shape(
    fuse_mount, monkeypatch
):
    backing, mount = fuse_mount
    state = _saved(backing)
    started = spy_populators(monkeypatch)
    with bigmodel.open_checkpoint(mount) as ckpt:
        got = {key: ckpt.get_tensor(key).clone() for key in ckpt.file_order()}
    assert [(k["threads"], k["chunk_bytes"]) for _, k in started] == [tuple(NETWORK_READ)]
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
