"""A file changed under bigmodel's mapping is a typed error in bigmodel's own reads, not SIGBUS.

Zero-copy tensors are views of the file; a file truncated in place makes touching them a
fatal signal. bigmodel's own reads check first; ``io="pread"`` gives a model that owns its
weights. Each scenario runs in a subprocess, so a signal fails the test instead of the suite.
"""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import bigmodel

SCENARIO = """
import os, sys, torch, bigmodel
folder, what = sys.argv[1], sys.argv[2]
ckpt = bigmodel.open_checkpoint(folder)
shard = ckpt.directory / ckpt.files[-1]
name = ckpt.keys_by_file()[ckpt.files[-1]][-1]
os.truncate(shard, 64)  # in place, as 'cp' or 'truncate' would
try:
    if what == "get_tensor":
        ckpt.get_tensor(name).sum()
    else:
        model = torch.nn.Module()
        model.register_buffer("w", torch.empty(256, device="meta"))
        bigmodel.load_checkpoint(model, ckpt, key_mapping={r"^.*$": "w"}, strict=False,
                                 dtype=torch.float64)
except bigmodel.InvalidCheckpointError as exc:
    print(exc.code)
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("what", ["get_tensor", "converting load"])
def test_a_file_truncated_in_place_is_a_typed_error_in_bigmodels_reads(tmp_path, safe, what):
    bigmodel.save_checkpoint({"w": torch.arange(256.0)}, tmp_path, safe_serialization=safe)
    done = _run(SCENARIO, str(tmp_path), what)
    assert done.returncode != -signal.SIGBUS, "the process died of SIGBUS"
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "file-changed"


def test_a_file_replaced_by_rename_is_not_a_change_the_old_mapping_keeps_reading(tmp_path):
    bigmodel.save_checkpoint({"w": torch.arange(256.0)}, tmp_path)
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        bigmodel.save_checkpoint({"w": torch.zeros(256)}, tmp_path)  # atomic: a new inode
        assert torch.equal(ckpt.get_tensor("w"), torch.arange(256.0))


POSIX_READ = """
import os, sys, torch, bigmodel
folder = sys.argv[1]
model = torch.nn.Linear(64, 64, bias=False)
bigmodel.load_checkpoint(model, folder, io="pread")
os.truncate(os.path.join(folder, "model.safetensors"), 0)
print(float(model.weight.sum()))
"""


def test_a_model_loaded_with_pread_owns_its_weights_and_outlives_its_file(tmp_path):
    weight = torch.randn(64, 64)
    bigmodel.save_checkpoint({"weight": weight}, tmp_path)
    done = _run(POSIX_READ, str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(float(weight.sum()), rel=1e-5)


def test_verifying_an_open_bin_checkpoint_whose_shard_was_removed_reports_it(tmp_path):
    bigmodel.save_checkpoint(
        {"a": torch.ones(64), "b": torch.zeros(64)},
        tmp_path,
        max_shard_size="300B",
        safe_serialization=False,
    )
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        (tmp_path / ckpt.files[0]).unlink()
        result = ckpt.verify()
    assert [p.code for p in result.problems] == ["file-changed"]
    assert ckpt.files[0] in result.problems[0].file


def test_reading_a_closed_checkpoint_whose_file_was_removed_is_a_typed_error(tmp_path):
    bigmodel.save_checkpoint({"w": torch.ones(4)}, tmp_path)
    ckpt = bigmodel.open_checkpoint(tmp_path)
    ckpt.close()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(bigmodel.CheckpointNotFoundError, match=r"model\.safetensors"):
        ckpt.get_tensor("w")
