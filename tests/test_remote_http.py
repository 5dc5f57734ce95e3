"""Checkpoints read from a URL: a real threaded HTTP server with byte ranges (and faults on
demand, see tests/_remote_servers.py) serves a folder saved by bigmodel; what is read over
HTTP must equal what is read from the folder, with every rule of a local checkpoint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyNet
from _remote_fixtures import save_served, server_fixture  # noqa: F401
from bigmodel import RemoteError, RemoteOptions
from bigmodel.checkpoint.open import verify_checkpoint
from bigmodel.foundations.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    InvalidCheckpointError,
)

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)


FAST = RemoteOptions(retries=3, backoff=0.01, max_backoff=0.05, timeout=10)


class Net(TinyNet):
    """TinyNet with an int64 buffer ``steps``."""

    def __init__(self) -> None:
        super().__init__(steps=7)


@pytest.fixture
def saved(tmp_path):
    model, _ = save_served(tmp_path, Net)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    return model, tmp_path


def _shards(root):
    return sorted(p.name for p in (root / "ckpt").glob("model-*.safetensors"))


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_sharded_checkpoint_opens_from_a_url_and_gives_the_local_tensors(saved, server):
    _, root = saved
    with (
        bigmodel.open_checkpoint(server.url("ckpt")) as remote,
        bigmodel.open_checkpoint(root / "ckpt") as local,
    ):
        assert remote.is_sharded and remote.files == local.files
        assert remote.keys() == local.keys()
        assert str(remote.path) == server.url("ckpt/model.safetensors.index.json")
        for key in local.keys():
            assert torch.equal(remote.get_tensor(key), local.get_tensor(key)), key
        assert remote.verify().verified == local.files


def test_load_checkpoint_from_a_url_equals_the_local_load_reading_only_byte_ranges(saved, server):
    model, root = saved
    remote_model = Net()
    report = bigmodel.load_checkpoint(remote_model, server.url("ckpt"))
    _same(remote_model, model)
    assert report.bytes_read == sum(t.nbytes for t in model.state_dict().values())
    gets = [(p, r) for m, p, r in server.faults.requests if m == "GET"]
    assert gets and all(r.startswith("bytes=") for _, r in gets)  # never a whole-file GET
    sizes = sum(f.stat().st_size for f in (root / "ckpt").iterdir())
    fetched = sum(int(r.split("-")[1]) - int(r[6:].split("-")[0]) + 1 for _, r in gets)
    assert fetched < 2 * sizes  # the load reads each file's bytes about once (headers twice)


def test_a_url_load_casts_and_reads_dtype_auto_from_the_remote_config(server):
    model = Net()
    bigmodel.load_checkpoint(model, server.url("ckpt"), dtype="auto")
    assert model.head.weight.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64


def test_from_pretrained_builds_a_model_from_a_url(saved, server):
    model = bigmodel.from_pretrained(Net, server.url("ckpt"))
    _same(model, saved[0])
    assert not model.training


def test_reads_run_ahead_no_further_than_the_inflight_bound(saved, server):
    model = Net()
    bigmodel.load_checkpoint(model, server.url("ckpt"), io=bigmodel.IOOptions(inflight_bytes=1))
    _same(model, saved[0])  # one tensor at a time still loads everything


def test_a_url_to_an_index_or_a_single_file_opens_too(saved, server, tmp_path):
    bigmodel.save_checkpoint(saved[0], tmp_path / "single")
    with bigmodel.open_checkpoint(server.url("ckpt/model.safetensors.index.json")) as ckpt:
        assert ckpt.is_sharded
    with bigmodel.open_checkpoint(server.url("single/model.safetensors")) as ckpt:
        assert not ckpt.is_sharded and torch.equal(
            ckpt.get_tensor("head.weight"), saved[0].head.weight.detach()
        )


def test_a_missing_url_raises_not_found_naming_what_was_looked_for(server):
    with pytest.raises(CheckpointNotFoundError, match=r"looked for model\.safetensors\.index"):
        bigmodel.open_checkpoint(server.url("nothing-here"))
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        bigmodel.open_checkpoint(server.url("nothing/model.safetensors"))


def test_a_corrupt_remote_shard_fails_verify_naming_its_url(saved, server):
    name = _shards(saved[1])[0]
    shard = saved[1] / "ckpt" / name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify_checkpoint(server.url("ckpt"))
    assert [p.code for p in result.problems] == ["digest-mismatch"]
    assert result.problems[0].file == server.url(f"ckpt/{name}")
    with pytest.raises(InvalidCheckpointError, match="digest-mismatch"):
        bigmodel.load_checkpoint(Net(), server.url("ckpt"), verify=True)


# -- hostile input: a remote index is untrusted ------------------------------------------


@pytest.mark.parametrize(
    "shard",
    ["../secret.safetensors", "..%2Fsecret.safetensors", "sub/x.safetensors", "/etc/x.safetensors"],
)
def test_an_index_naming_a_shard_outside_its_prefix_is_refused_and_never_requested(
    saved, server, shard
):
    root = saved[1]
    (root / "secret.safetensors").write_bytes((root / "ckpt" / _shards(root)[0]).read_bytes())
    index_path = root / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpointError) as caught:
        bigmodel.open_checkpoint(server.url("ckpt"))
    codes = {p.code for p in caught.value.problems}
    assert codes & {"unsafe-shard-name", "missing-shard"}, codes
    assert not any(
        "secret" in p and not p.startswith("/ckpt/")
        for p in server.faults.paths("HEAD") + server.faults.paths("GET")
    )


def test_a_remote_header_that_lies_is_refused_like_a_local_one(saved, server):
    shard = saved[1] / "ckpt" / _shards(saved[1])[1]
    data = bytearray(shard.read_bytes())
    data[0:8] = (len(data)).to_bytes(8, "little")  # header past the end of the file
    shard.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpointError, match="header-past-eof"):
        bigmodel.open_checkpoint(server.url("ckpt"))


def test_a_remote_bin_checkpoint_is_refused_with_the_fix(saved, tmp_path, server):
    bigmodel.save_checkpoint(saved[0], tmp_path / "legacy", safe_serialization=False)
    with pytest.raises(InvalidCheckpointError, match="remote-bin-unsupported"):
        bigmodel.open_checkpoint(server.url("legacy"))


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["status_500", "status_503", "drop", "truncate"])
def test_transient_faults_are_retried_and_the_load_is_exact(saved, server, fault):
    setattr(server.faults, fault, 2)
    with bigmodel.open_checkpoint(server.url("ckpt"), remote=FAST) as ckpt:
        model = Net()
        bigmodel.load_checkpoint(model, ckpt)
    _same(model, saved[0])
    assert getattr(server.faults, fault) == 0  # the faults did happen


def test_a_server_that_keeps_failing_raises_a_typed_error_with_the_url_and_status(server):
    server.faults.status_500 = 10**6
    with pytest.raises(RemoteError) as caught:
        bigmodel.open_checkpoint(server.url("ckpt"), remote=FAST)
    assert caught.value.status == 500
    assert server.url("ckpt/") in str(caught.value) and "HTTP 500" in str(caught.value)


def test_a_body_that_is_always_cut_short_raises_after_the_retries(server):
    server.faults.truncate = 10**6
    with pytest.raises(RemoteError, match="no complete answer"):
        bigmodel.open_checkpoint(server.url("ckpt"), remote=FAST)


def test_access_denied_raises_the_permission_error(server):
    server.faults.fixed_status["model.safetensors.index.json"] = 403
    with pytest.raises(CheckpointPermissionError, match="HTTP 403"):
        bigmodel.open_checkpoint(server.url("ckpt"), remote=FAST)


def test_a_content_length_above_the_file_size_raises_after_the_retries(saved, server):
    server.faults.extra_length = 7
    with pytest.raises(RemoteError, match="shorter than its size said"):
        bigmodel.open_checkpoint(server.url(f"ckpt/{_shards(saved[1])[0]}"), remote=FAST)


def test_a_content_length_below_the_file_size_is_a_truncated_file(saved, server):
    server.faults.extra_length = -7
    with pytest.raises(InvalidCheckpointError, match=r"\[truncated\]"):
        bigmodel.open_checkpoint(server.url(f"ckpt/{_shards(saved[1])[0]}"), remote=FAST)


def test_credentials_in_a_url_are_never_shown_nor_logged(server, caplog):
    url = (
        server.url("ckpt").replace("http://", "http://user:s3cret-pass@")
        + "?X-Amz-Signature=s3cret-sig"
    )
    server.faults.status_500 = 10**6
    with caplog.at_level(logging.DEBUG, logger="bigmodel"), pytest.raises(RemoteError) as caught:
        bigmodel.open_checkpoint(url, remote=FAST)
    shown = str(caught.value) + caplog.text
    assert "s3cret" not in shown


def test_inspect_and_verify_accept_a_url_without_importing_torch(server):
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['bigmodel', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('bigmodel', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    for argv in (["inspect", server.url("ckpt"), "--json"], ["verify", server.url("ckpt")]):
        out = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "torch imported: False" in out.stderr
    listing = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bigmodel", "inspect", server.url("ckpt"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert listing["path"] == server.url("ckpt/model.safetensors.index.json")
