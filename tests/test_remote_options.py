"""The ``remote=`` options reach every verb that opens a URL (``load_checkpoint``,
``from_pretrained``, ``estimate_memory``) and ``bigmodel estimate URL`` works: a real threaded
HTTP server (tests/_remote_servers.py) answers 500 once, which the default options retry and
``RemoteOptions(retries=0)`` does not, so the outcome shows which options were used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bigmodel
from _models import TinyNet
from _remote_fixtures import saved_fixture, server_fixture  # noqa: F401
from bigmodel import RemoteError, RemoteOptions
from bigmodel.api.estimate import estimate_memory

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)

NO_RETRY = RemoteOptions(retries=0, timeout=10)
FAST = RemoteOptions(retries=3, backoff=0.01, max_backoff=0.05, timeout=10)


Net = TinyNet


def test_load_checkpoint_reads_a_url_with_the_remote_options_it_is_given(server):
    server.faults.status_500 = 1
    with pytest.raises(RemoteError, match="HTTP 500"):
        bigmodel.load_checkpoint(Net(), server.url("ckpt"), remote=NO_RETRY)
    server.faults.status_500 = 1
    bigmodel.load_checkpoint(Net(), server.url("ckpt"), remote=FAST)
    assert server.faults.status_500 == 0


def test_load_checkpoint_with_dtype_auto_opens_the_url_with_the_same_options(server):
    server.faults.status_500 = 1
    with pytest.raises(RemoteError, match="HTTP 500"):
        bigmodel.load_checkpoint(Net(), server.url("ckpt"), dtype="auto", remote=NO_RETRY)


def test_from_pretrained_passes_its_remote_options_to_the_load(server):
    server.faults.status_500 = 1
    with pytest.raises(RemoteError, match="HTTP 500"):
        bigmodel.from_pretrained(Net, server.url("ckpt"), remote=NO_RETRY)
    model = bigmodel.from_pretrained(Net, server.url("ckpt"), remote=FAST)
    assert model.head.weight.device.type == "cpu"


def test_estimate_memory_of_a_url_uses_its_remote_options(server):
    server.faults.status_500 = 1
    with pytest.raises(RemoteError, match="HTTP 500"):
        estimate_memory(server.url("ckpt"), max_memory={"cpu": 10**9}, remote=NO_RETRY)
    plan = estimate_memory(server.url("ckpt"), max_memory={"cpu": 10**9}, remote=FAST)
    assert plan.fits and plan.total == sum(t.nbytes for t in Net().state_dict().values())


def test_bigmodel_estimate_accepts_a_url(server):
    out = subprocess.run(
        [sys.executable, "-m", "bigmodel", "estimate", server.url("ckpt"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] and plan["total_bytes"] == sum(
        t.nbytes for t in Net().state_dict().values()
    )
