"""Plain HTTP(S) range reads go straight into the tensors (storage/remote_http.py): the body of
each ``Range`` request is read by ``readinto`` into the tensors' memory, and any answer that is
not exactly the bytes asked for is read again through the object-store client, whose retries
and typed errors apply unchanged. A real threaded HTTP server (tests/_remote_servers.py) serves
the checkpoint and injects the faults."""

from __future__ import annotations

import shutil

import pytest
import torch

import bigmodel
from _models import TinyNet
from _remote_fixtures import save_served, server_fixture  # noqa: F401
from _remote_servers import http_server, self_signed
from bigmodel import RemoteOptions
from bigmodel.storage.remote_http import MAX_MISSES, DirectHttp

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)

FAST = RemoteOptions(retries=3, backoff=0.01, max_backoff=0.05, timeout=10, chunk_bytes=4096)


@pytest.fixture
def saved(tmp_path):
    return save_served(tmp_path, lambda: TinyNet(rows=400), max_shard_size=20_000)


def _load_counting(
    server, monkeypatch, fault: str | None = None
) -> tuple[TinyNet, list[tuple[str, int, int]]]:
    """Load the served checkpoint (``fault`` once, after its headers were read); the ranges
    read through the object-store client."""
    fallbacks: list[tuple[str, int, int]] = []
    model = TinyNet(rows=400)
    with bigmodel.open_checkpoint(server.url("ckpt"), remote=FAST) as ckpt:
        read = ckpt.remote.read

        def counted(name: str, start: int, end: int):
            fallbacks.append((name, start, end))
            return read(name, start, end)

        monkeypatch.setattr(ckpt.remote, "read", counted)
        if fault is not None:
            setattr(server.faults, fault, 1)
        bigmodel.load_checkpoint(model, ckpt)
    return model, fallbacks


def _same(a, b) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_http_ranges_are_read_straight_into_the_tensors_without_the_object_store_client(
    saved, server, monkeypatch
):
    model, fallbacks = _load_counting(server, monkeypatch)
    _same(model, saved[0])
    assert fallbacks == []
    gets = [r for m, _, r in server.faults.requests if m == "GET"]
    assert len(gets) > 3  # several ranges (4 KiB requests), each read once


@pytest.mark.parametrize("fault", ["drop", "truncate", "status_500", "status_503", "ignore_range"])
def test_an_answer_the_direct_path_does_not_take_is_read_again_through_the_object_store_client(
    saved, server, monkeypatch, fault
):
    model, fallbacks = _load_counting(server, monkeypatch, fault)
    _same(model, saved[0])
    assert len(fallbacks) == 1 and getattr(server.faults, fault) == 0


def test_a_folder_stops_trying_the_direct_path_after_repeated_misses(saved, server):
    direct = DirectHttp.for_url(server.url("ckpt"), timeout=10)
    assert direct is not None
    server.faults.ignore_range = 10**6
    memory = memoryview(bytearray(8))
    for _ in range(MAX_MISSES):
        assert direct.active
        assert direct.read_into("model-00001-of-00002.safetensors", 0, 8, [(0, memory)]) is None
    assert not direct.active
    server.faults.ignore_range = 0
    direct.close()


def test_the_bytes_between_two_segments_are_returned_and_the_segments_filled(saved, server):
    (name,) = [p.name for p in (saved[1] / "ckpt").glob("model-00001-*.safetensors")]
    data = (saved[1] / "ckpt" / name).read_bytes()
    direct = DirectHttp.for_url(server.url("ckpt"), timeout=10)
    assert direct is not None
    first, second = memoryview(bytearray(10)), memoryview(bytearray(20))
    gaps = direct.read_into(name, 100, 200, [(110, first), (150, second)])
    assert gaps is not None
    assert bytes(first) == data[110:120] and bytes(second) == data[150:170]
    assert [(at, bytes(m)) for at, m in gaps] == [
        (100, data[100:110]),
        (120, data[120:150]),
        (170, data[170:200]),
    ]
    direct.close()


@pytest.mark.parametrize(
    ("url", "environment"),
    [
        ("http://user:secret@127.0.0.1:1/ckpt", {}),
        ("http://127.0.0.1:1/ckpt?X-Amz-Signature=abc", {}),
        ("http://127.0.0.1:1/ckpt", {"HTTPS_PROXY": "http://proxy:3128"}),
        ("http://127.0.0.1:1/ckpt", {"BIGMODEL_REMOTE_CLIENT": "obstore"}),
        ("s3://bucket/ckpt", {}),
    ],
)
def test_credentials_a_query_a_proxy_or_the_switch_leave_reads_to_the_object_store_client(
    url, environment, monkeypatch
):
    for name in ("http_proxy", "https_proxy", "all_proxy", "BIGMODEL_REMOTE_CLIENT"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert DirectHttp.for_url(url, timeout=1) is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_https_ranges_are_read_directly_and_an_untrusted_certificate_is_refused(
    saved, tmp_path, monkeypatch
):
    cert, key = self_signed(tmp_path)
    (name,) = [p.name for p in (saved[1] / "ckpt").glob("model-00001-*.safetensors")]
    data = (saved[1] / "ckpt" / name).read_bytes()
    with http_server(saved[1], tls=(cert, key)) as server:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        untrusted = DirectHttp.for_url(server.url("ckpt"), timeout=10)
        assert untrusted is not None and untrusted.https
        memory = memoryview(bytearray(64))
        assert untrusted.read_into(name, 0, 64, [(0, memory)]) is None  # verification is on
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = DirectHttp.for_url(server.url("ckpt"), timeout=10)
        assert trusted is not None
        assert trusted.read_into(name, 100, 164, [(100, memory)]) == []
        assert bytes(memory) == data[100:164]
        trusted.close()
