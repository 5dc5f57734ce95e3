"""Disk offload from a checkpoint under a URL: a remote file cannot be mapped, so the offloaded
tensors are written once into ``offload_folder`` during the load and every forward reads them
from there, never from the network (a real threaded HTTP server counts the requests, see
tests/_remote_servers.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyLM
from _remote_servers import http_server
from bigmodel import RemoteOptions
from bigmodel.execution import offload_sources
from bigmodel.storage import remote_offload, remote_read
from bigmodel.storage.safetensors import SafetensorsFile

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)


def _model() -> TinyLM:
    """An untied head with a bias, width 32, four blocks."""
    return TinyLM(width=32, layers=4, tie=False, head_bias=True)


IDS = torch.tensor([[1, 5, 7, 2, 39]])
MAP = {
    "embed": "cpu",
    "layers.0": "cpu",
    "layers.1": "disk",
    "layers.2": "disk",
    "layers.3": "cpu",
    "norm": "disk",
    "head": "cpu",
}
ON_DISK = ("layers.1.", "layers.2.", "norm.")


@pytest.fixture
def served(tmp_path):
    torch.manual_seed(0)
    reference = _model().eval()
    bigmodel.save_checkpoint(reference, tmp_path / "ckpt", max_shard_size=3000)
    with http_server(tmp_path) as server:
        yield reference, server


def _disk_state(reference: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.state_dict().items() if k.startswith(ON_DISK)}


def _load(server, folder, **kwargs) -> TinyLM:
    with bigmodel.init_empty_weights():
        model = _model().eval()
    bigmodel.load_checkpoint(
        model, server.url("ckpt"), device_map=MAP, offload_folder=folder, **kwargs
    )
    return model


def _folder_tensors(folder) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        file = SafetensorsFile(path)
        found |= {name: file.get_tensor(name).clone() for name in file.entries}
        file.close()
    return found


def test_a_url_load_with_disk_entries_gives_the_outputs_of_the_in_memory_model(served, tmp_path):
    reference, server = served
    model = _load(server, tmp_path / "offload")
    assert model.layers[1].up.weight.is_meta and not model.layers[0].up.weight.is_meta
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(IDS), reference(IDS))


def test_the_offload_folder_holds_the_offloaded_tensors_of_a_url_load_byte_for_byte(
    served, tmp_path
):
    reference, server = served
    _load(server, tmp_path / "offload")
    written = _folder_tensors(tmp_path / "offload")
    expected = _disk_state(reference)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


def test_forwards_after_a_url_load_with_disk_entries_make_no_further_requests(served, tmp_path):
    reference, server = served
    model = _load(server, tmp_path / "offload")
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))
        seen = len(server.faults.requests)
        for _ in range(2):
            assert torch.equal(model(IDS), reference(IDS))
    assert len(server.faults.requests) == seen  # the second and third forward read local files


def test_a_url_load_that_casts_disk_entries_writes_them_once_at_the_new_dtype(served, tmp_path):
    reference, server = served
    model = _load(server, tmp_path / "offload", dtype=torch.bfloat16)
    written = _folder_tensors(tmp_path / "offload")
    assert written.keys() == _disk_state(reference).keys()
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    seen = len(server.faults.requests)
    with torch.no_grad():
        assert torch.equal(model(IDS), reference.to(torch.bfloat16)(IDS))
    assert len(server.faults.requests) == seen


def test_a_url_load_writes_each_offloaded_tensor_once_in_one_file_per_dtype(served, tmp_path):
    _, server = served
    _load(server, tmp_path / "offload")
    assert len(list((tmp_path / "offload").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "offload").glob(".*"))  # no temporary file left
    local = tmp_path / "local-offload"
    with bigmodel.init_empty_weights():
        model = _model().eval()
    bigmodel.load_checkpoint(model, tmp_path / "ckpt", device_map=MAP, offload_folder=local)
    with torch.no_grad():
        assert torch.equal(_load(server, tmp_path / "again")(IDS), model(IDS))


INFLIGHT = 24 * 2**10  # three of the 8 KiB weights


class InFlight:
    """Bytes in flight, counted from a wrapped client and the scheduler's allocations: running
    range requests (their response buffers) plus tensors allocated and not yet handed out."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.now += nbytes
            self.peak = max(self.peak, self.now)


def _count_in_flight(monkeypatch, folder) -> InFlight:
    count = InFlight()
    allocate, store, read = remote_read._buffer, remote_offload._store, folder.read

    def counted_buffer(nbytes: int):
        count.add(nbytes)
        return allocate(nbytes)

    def counted_store(out, key, tensor):
        count.add(-tensor.nbytes)  # handed out: the writer holds it now
        store(out, key, tensor)

    def counted_read(name: str, start: int, end: int):
        count.add(end - start)
        try:
            return read(name, start, end)
        finally:
            count.add(start - end)

    monkeypatch.setattr(remote_read, "_buffer", counted_buffer)
    monkeypatch.setattr(remote_offload, "_store", counted_store)
    monkeypatch.setattr(folder, "read", counted_read)
    return count


def test_remote_offload_fetches_concurrently_and_stays_within_the_in_flight_bound(
    served, tmp_path, monkeypatch
):
    reference, server = served
    options = RemoteOptions(chunk_bytes=2048, threads=8)
    with bigmodel.open_checkpoint(server.url("ckpt"), remote=options) as ckpt:
        count = _count_in_flight(monkeypatch, ckpt.remote)
        with bigmodel.init_empty_weights():
            targets = _model().state_dict(keep_vars=True)
        items = [(key, [key]) for key in ckpt.keys() if key.startswith(ON_DISK)]
        server.faults.delay = 0.02  # requests last long enough to overlap
        specs = offload_sources.offload_sources(
            ckpt, targets, items, lambda _, t: t.dtype, tmp_path / "off", inflight_bytes=INFLIGHT
        )
    assert server.faults.max_active >= 2  # concurrent range requests
    assert 0 < count.peak <= INFLIGHT and count.now == 0
    expected = _disk_state(reference)
    assert specs.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(specs[name].load(), tensor), name


def test_a_remote_offload_that_fails_raises_the_typed_error_and_leaves_no_partial_file(
    served, tmp_path
):
    _, server = served
    options = RemoteOptions(retries=1, backoff=0.01, max_backoff=0.02, timeout=5)
    with bigmodel.open_checkpoint(server.url("ckpt"), remote=options) as ckpt:
        with bigmodel.init_empty_weights():
            targets = _model().state_dict(keep_vars=True)
        items = [(key, [key]) for key in ckpt.keys() if key.startswith(ON_DISK)]
        for path in (tmp_path / "ckpt").glob("*.safetensors"):
            server.faults.fixed_status[path.name] = 500
        with pytest.raises(bigmodel.RemoteError, match="HTTP 500"):
            offload_sources.offload_sources(
                ckpt, targets, items, lambda _, t: t.dtype, tmp_path / "off"
            )
    assert list((tmp_path / "off").iterdir()) == []


def test_a_url_load_bounds_its_offload_reads_by_the_callers_in_flight_bytes(
    served, tmp_path, monkeypatch
):
    reference, server = served
    seen: list[int | None] = []
    real = offload_sources.offload_sources

    def spy(*args, inflight_bytes=None, **kwargs):
        seen.append(inflight_bytes)
        return real(*args, inflight_bytes=inflight_bytes, **kwargs)

    monkeypatch.setattr("bigmodel.api.load.offload_sources", spy)
    model = _load(server, tmp_path / "offload", io=bigmodel.IOOptions(inflight_bytes=INFLIGHT))
    assert seen == [INFLIGHT]
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))


def test_a_url_load_to_bf16_casts_each_tensor_as_its_bytes_arrive(served, monkeypatch):
    reference, server = served
    seen: list[list[torch.dtype | None]] = []
    real = remote_read.remote_tensors

    def spy(*args, dtypes=None, **kwargs):
        seen.append(list(dtypes or []))
        return real(*args, dtypes=dtypes, **kwargs)

    monkeypatch.setattr("bigmodel.execution.reading.remote_tensors", spy)
    model = _model()
    bigmodel.load_checkpoint(model, server.url("ckpt"), dtype=torch.bfloat16)
    assert seen and all(dtypes and set(dtypes) == {torch.bfloat16} for dtypes in seen)
    for name, tensor in reference.state_dict().items():
        got = model.state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, tensor.to(torch.bfloat16)), name
