"""How a remote load cuts tensors into range requests: adjacent tensors share one request up
to ``chunk_bytes``, a larger tensor is split, and the in-flight bound still holds; checked on
the plan and against a real threaded HTTP server (tests/_remote_servers.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigmodel
from _remote_servers import http_server
from bigmodel import RemoteOptions
from bigmodel.storage import remote_read
from bigmodel.storage.remote_read import MAX_GAP, RemoteRange, plan_requests, remote_tensors

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)


def _range(key: str, begin: int, nbytes: int, file: str = "a.safetensors") -> RemoteRange:
    return RemoteRange(key, file, begin, nbytes, torch.uint8, (nbytes,))


def test_adjacent_tensors_share_a_request_and_a_large_one_is_split():
    items = [
        _range("a", 100, 10),
        _range("b", 110, 30),
        _range("empty", 140, 0),
        _range("c", 140, 250),
        _range("d", 0, 5, file="b.safetensors"),
    ]
    requests = plan_requests(items, 100)
    assert [(r.file, r.start, r.end) for r in requests] == [
        ("a.safetensors", 100, 200),
        ("a.safetensors", 200, 300),
        ("a.safetensors", 300, 390),
        ("b.safetensors", 0, 5),
    ]
    assert [(p.item, p.offset, p.length) for p in requests[0].parts] == [
        (0, 0, 10),
        (1, 0, 30),
        (3, 0, 60),
    ]
    assert [(p.item, p.offset, p.length) for p in requests[2].parts] == [(3, 160, 90)]


def test_tensors_out_of_file_order_or_with_small_gaps_share_a_request():
    # a weight after its bias in the file, requested weight first; then a small gap
    items = [_range("w", 32, 256), _range("b", 0, 32), _range("w2", 320, 256)]
    (request,) = plan_requests(items, 1000)
    assert (request.start, request.end) == (0, 576)
    assert [p.at for p in request.parts] == [32, 0, 320]


def test_a_gap_wider_than_the_limit_starts_a_new_request():
    far = MAX_GAP + 1
    requests = plan_requests([_range("a", 0, 10), _range("b", 10 + far, 10)], 10 * far)
    assert [(r.start, r.end) for r in requests] == [(0, 10), (10 + far, 20 + far)]


class Many(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(40))
        self.big = nn.Linear(256, 256)


@pytest.mark.parametrize("inflight", [1, 2**30])
def test_a_load_of_many_small_tensors_makes_few_requests_and_is_exact(tmp_path, inflight):
    torch.manual_seed(0)
    model = Many()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt")
    options = RemoteOptions(chunk_bytes=2**16, cache_dir=None)
    with http_server(tmp_path) as server:
        loaded = Many()
        with bigmodel.open_checkpoint(server.url("ckpt"), remote=options) as ckpt:
            server.faults.requests.clear()
            bigmodel.load_checkpoint(loaded, ckpt, io=bigmodel.IOOptions(inflight_bytes=inflight))
        gets = server.faults.paths("GET")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    total = sum(t.nbytes for t in model.state_dict().values())
    assert len(gets) <= total // 2**16 + 2  # 82 tensors in a handful of requests


def test_a_split_never_cuts_an_element_so_each_part_can_be_cast_alone():
    items = [
        RemoteRange("a", "f", 0, 40, torch.float32, (10,)),
        RemoteRange("b", "f", 40, 4000, torch.float32, (1000,)),
    ]
    requests = plan_requests(items, 1001)
    assert all(p.length % 4 == 0 and p.offset % 4 == 0 for r in requests for p in r.parts)
    assert sum(p.length for r in requests for p in r.parts) == 4040


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(3, 5)  # 15 and 5 elements: parts of odd sizes around them
        self.big = nn.Linear(256, 256)
        self.register_buffer("steps", torch.arange(1001))


@pytest.mark.parametrize("client", ["http", "obstore", "cache"])
def test_a_cast_read_converts_chunk_by_chunk_into_what_tensor_to_gives(
    tmp_path, monkeypatch, client
):
    torch.manual_seed(0)
    model = Mixed()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt")
    if client == "obstore":
        monkeypatch.setenv("BIGMODEL_REMOTE_CLIENT", "obstore")
    options = RemoteOptions(chunk_bytes=4099, threads=4, cache_dir=tmp_path / "cache")
    sizes: list[int] = []
    allocate = remote_read._buffer

    def counted(nbytes: int):
        sizes.append(nbytes)
        return allocate(nbytes)

    monkeypatch.setattr(remote_read, "_buffer", counted)
    with http_server(tmp_path) as server:
        if client == "cache":  # a first load fills the cache; the second reads it locally
            bigmodel.load_checkpoint(Mixed(), server.url("ckpt"), remote=options)
        with bigmodel.open_checkpoint(server.url("ckpt"), remote=options) as ckpt:
            keys = sorted(ckpt.keys())
            ranges = [ckpt.remote_range(key) for key in keys]
            assert (ranges[0].local is not None) == (client == "cache")
            sizes.clear()
            got = dict(
                remote_tensors(
                    ckpt.remote, ranges, max_inflight_bytes=2**16, dtypes=[torch.bfloat16] * 5
                )
            )
    state = model.state_dict()
    for key in keys:
        expected = state[key].to(torch.bfloat16) if state[key].is_floating_point() else state[key]
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    assert max(sizes) == 256 * 256 * 2  # the big weight never exists as float32 whole
