"""``RemoteOptions(cache_dir=...)``: what a load reads from a URL is kept, validated by size and
digest, and reused by the next load. A real threaded HTTP server (tests/_remote_servers.py)
counts the requests, so "reused" means no byte-range request for a cached shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyNet
from _remote_fixtures import save_served, server_fixture  # noqa: F401
from bigmodel import RemoteOptions
from bigmodel.storage.atomic import temp_name
from bigmodel.storage.remote_cache import RemoteCache, sweep_temporaries

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)


class Net(TinyNet):
    def __init__(self) -> None:
        super().__init__(rows=40_000)  # 2.5 MB: past the first read of its shard


@pytest.fixture
def saved(tmp_path):
    return save_served(tmp_path, Net)


def _options(tmp_path):
    return RemoteOptions(
        retries=2, backoff=0.01, timeout=10, chunk_bytes=2**18, cache_dir=tmp_path / "cache"
    )


def _shards(root):
    return sorted(p.name for p in (root / "ckpt").glob("model-*.safetensors"))


def _shard_gets(server):
    return [p.rsplit("/", 1)[-1] for p in server.faults.paths("GET") if p.endswith(".safetensors")]


def _cached(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def _load(url, options):
    model = Net()
    bigmodel.load_checkpoint(model, url, remote=options)
    return model


def _same(a, b):
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_a_second_load_reads_cached_shards_without_a_range_request(saved, server, tmp_path):
    model, root = saved
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert _cached(tmp_path) == _shards(root)  # every shard kept whole, no temporary left
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert _shard_gets(server) == []


def test_a_corrupted_cache_entry_is_detected_and_fetched_again(saved, server, tmp_path):
    model, root = saved
    _load(server.url("ckpt"), _options(tmp_path))
    victim = _shards(root)[1]
    (entry,) = (tmp_path / "cache").rglob(victim)
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF  # same size: only the digest can tell
    entry.write_bytes(bytes(data))
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert set(_shard_gets(server)) == {victim}
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)  # and the entry was replaced
    assert _shard_gets(server) == []


def test_a_cache_entry_of_another_size_is_fetched_again(saved, server, tmp_path):
    model, root = saved
    _load(server.url("ckpt"), _options(tmp_path))
    victim = _shards(root)[0]
    (entry,) = (tmp_path / "cache").rglob(victim)
    entry.write_bytes(entry.read_bytes()[:-3])
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert set(_shard_gets(server)) == {victim}


def test_a_load_that_reads_part_of_a_shard_leaves_no_entry_and_no_temporary_file(
    saved, server, tmp_path
):
    class Part(nn.Module):  # no embedding: its shard is read only as far as its header
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 40)

    bigmodel.load_checkpoint(Part(), server.url("ckpt"), strict=False, remote=_options(tmp_path))
    index = json.loads((saved[1] / "ckpt" / "model.safetensors.index.json").read_text())
    cached = _cached(tmp_path)
    assert index["weight_map"]["embed.weight"] not in cached
    assert not [n for n in cached if n.startswith(".")]  # no temporary file survives the load


def test_concurrent_loads_sharing_a_cache_load_exact_weights_and_leave_valid_entries(
    saved, server, tmp_path
):
    model, root = saved
    results: list[nn.Module | BaseException] = []

    def run() -> None:
        try:
            results.append(_load(server.url("ckpt"), _options(tmp_path)))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for got in results:
        assert isinstance(got, nn.Module), got
        _same(got, model)
    assert _cached(tmp_path) == _shards(root)
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert _shard_gets(server) == []


def test_a_single_file_checkpoint_is_cached_and_checked_by_its_embedded_digest(
    saved, server, tmp_path
):
    model, root = saved
    bigmodel.save_checkpoint(model, root / "single")
    url = server.url("single")
    _same(_load(url, _options(tmp_path)), model)
    (entry,) = (tmp_path / "cache").rglob("model.safetensors")
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    server.faults.requests.clear()
    _same(_load(url, _options(tmp_path)), model)
    assert set(_shard_gets(server)) == {"model.safetensors"}


_FILL = """
import sys
sys.path.insert(0, sys.argv[1])
import bigmodel
from _models import TinyNet
options = bigmodel.RemoteOptions(cache_dir=sys.argv[3], chunk_bytes=2**16, threads=1)
bigmodel.load_checkpoint(TinyNet(rows=40_000), sys.argv[2], remote=options)
"""


def _temporaries(tmp_path):
    return [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()]


def test_a_fill_killed_mid_way_leaves_debris_that_the_next_load_removes(saved, server, tmp_path):
    model, root = saved
    server.faults.delay = 0.05  # one request at a time, 20 per second: the fill takes seconds
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FILL,
            str(Path(__file__).parent),
            server.url("ckpt"),
            str(tmp_path / "cache"),
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in _temporaries(tmp_path)):
            assert child.poll() is None and time.monotonic() < deadline, "no fill was seen"
            time.sleep(0.02)
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
    debris = _temporaries(tmp_path)
    assert debris and all(f"-{child.pid}-" in p.name for p in debris)
    server.faults.delay = 0
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert not _temporaries(tmp_path)
    assert _cached(tmp_path) == _shards(root)
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert _shard_gets(server) == []


def test_a_temporary_file_that_a_live_load_is_writing_is_never_swept(tmp_path):
    cache = RemoteCache(tmp_path, "http://example/ckpt")
    cache.expect("model.safetensors", 100, None)  # this (live) process writes it, locked
    (temp,) = cache.root.glob(".model.safetensors*")
    assert sweep_temporaries(cache.root) == 0
    RemoteCache(tmp_path, "http://example/ckpt")  # a second load opening the same folder
    assert temp.exists()
    cache.close()
    assert not temp.exists()


def test_a_temporary_file_of_a_dead_process_is_swept_and_an_entry_is_kept(tmp_path):
    cache = RemoteCache(tmp_path, "http://example/ckpt")
    cache.root.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = cache.root / temp_name("model.safetensors", f"{dead.stdout.strip()}-ab12cd")
    stale.write_bytes(b"x" * 10)
    entry = cache.root / "model.safetensors"
    entry.write_bytes(b"y" * 10)
    assert sweep_temporaries(cache.root) == 1
    assert not stale.exists() and entry.exists()


def test_a_cache_entry_of_garbage_with_the_right_size_is_fetched_again(saved, server, tmp_path):
    model, root = saved
    _load(server.url("ckpt"), _options(tmp_path))
    victim = _shards(root)[0]
    (entry,) = (tmp_path / "cache").rglob(victim)
    entry.write_bytes(os.urandom(entry.stat().st_size))  # not even a header
    server.faults.requests.clear()
    _same(_load(server.url("ckpt"), _options(tmp_path)), model)
    assert set(_shard_gets(server)) == {victim}
