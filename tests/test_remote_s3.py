"""Checkpoints read from ``s3://``: moto's standalone S3 server (a real S3-protocol endpoint on
localhost) holds a bucket created by the fixture; the client finds it through the usual
``AWS_*`` environment, as it would find AWS."""

from __future__ import annotations

import pytest
import torch

import bigmodel
from _models import TinyNet
from _remote_servers import moto_s3_server, s3_environment, upload_folder
from bigmodel.foundations.errors import CheckpointNotFoundError, InvalidCheckpointError

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)
pytest.importorskip("moto.server", reason="the local S3 server (moto[server]) is not installed")
pytest.importorskip("boto3", reason="boto3 (to fill the test bucket) is not installed")


Net = TinyNet


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def bucket(endpoint, tmp_path, monkeypatch):
    for key, value in s3_environment(endpoint).items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    model = Net()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt", max_shard_size=2500)
    name = f"models-{tmp_path.name.lower().replace('_', '-')}"[:60]
    upload_folder(endpoint, name, "team/net", tmp_path / "ckpt")
    return model, name


def test_a_sharded_checkpoint_loads_from_an_s3_prefix(bucket):
    model, name = bucket
    loaded = Net()
    report = bigmodel.load_checkpoint(loaded, f"s3://{name}/team/net")
    assert report.checkpoint == f"s3://{name}/team/net/model.safetensors.index.json"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with bigmodel.open_checkpoint(f"s3://{name}/team/net") as ckpt:
        assert ckpt.verify().problems == []


def test_a_prefix_without_a_checkpoint_is_not_found(bucket):
    with pytest.raises(CheckpointNotFoundError, match="looked for"):
        bigmodel.open_checkpoint(f"s3://{bucket[1]}/team/other")


def test_an_s3_index_naming_a_key_outside_its_prefix_is_refused(bucket, endpoint, tmp_path):
    import json

    folder = tmp_path / "hostile"
    folder.mkdir()
    index = {
        "metadata": {},
        "weight_map": {"head.weight": "../net/model-00001-of-00006.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    upload_folder(endpoint, bucket[1], "team/hostile", folder)
    with pytest.raises(InvalidCheckpointError, match="unsafe-shard-name"):
        bigmodel.open_checkpoint(f"s3://{bucket[1]}/team/hostile")
