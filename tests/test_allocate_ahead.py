"""A converting load casts into outputs allocated ahead, with their pages already mapped, by a
background thread bounded by ``IOOptions.inflight_bytes`` (bigmodel.storage.allocate_ahead)."""

import gc
import os
import threading
import time
import weakref

import pytest
import torch

import bigmodel
import bigmodel.execution.reading as reading_module
import bigmodel.storage.allocate_ahead as allocate_module
from _models import Linears
from bigmodel.foundations.types import IOOptions
from bigmodel.storage.allocate_ahead import AllocateAhead
from bigmodel.storage.page_cache import evict
from bigmodel.storage.readahead import FileMappings, populate_private


def _saved(tmp_path, *, cold=True):
    """A saved Linears' state, its files evicted from the page cache (a cold load) by default."""
    torch.manual_seed(0)
    model = Linears()
    bigmodel.save_checkpoint(model, tmp_path, max_shard_size="20KB")
    for path in tmp_path.glob("*.safetensors") if cold else ():
        evict(path)
    return model.state_dict()


def _allocate_threads():
    return {t for t in threading.enumerate() if t.name == "bigmodel-allocate" and t.is_alive()}


class _Spy:
    """Records every AllocateAhead made and every output it allocated (weakly)."""

    def __init__(self, monkeypatch):
        self.instances: list[AllocateAhead] = []
        self.outputs: list[weakref.ref[torch.Tensor]] = []
        self.addresses: list[int] = []
        self.pending_counts: list[int] = []
        real_init, real_populate = AllocateAhead.__init__, allocate_module.populate_private

        def init(inner, *args, **kwargs):
            self.instances.append(inner)
            real_init(inner, *args, **kwargs)

        def populate(tensor):
            self.outputs.append(weakref.ref(tensor))
            self.addresses.append(tensor.data_ptr())
            return real_populate(tensor)

        monkeypatch.setattr(AllocateAhead, "__init__", init)
        monkeypatch.setattr(allocate_module, "populate_private", populate)


def test_a_converting_load_places_the_outputs_allocated_ahead_bit_exact(tmp_path, monkeypatch):
    state = _saved(tmp_path)
    spy = _Spy(monkeypatch)
    with bigmodel.init_empty_weights():
        model = Linears()
    bigmodel.load_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert len(spy.instances) == 1
    placed = {p.data_ptr() for p in model.parameters()}
    assert set(spy.addresses) == placed  # every weight is an output allocated ahead, none left over
    for name, value in model.state_dict().items():
        expected = state[name].to(torch.bfloat16)
        assert torch.equal(value.view(torch.int16), expected.view(torch.int16)), name
    assert spy.instances[0].pending == 0


def test_a_same_dtype_load_allocates_nothing_ahead_and_stays_zero_copy(tmp_path, monkeypatch):
    _saved(tmp_path)
    spy = _Spy(monkeypatch)
    with bigmodel.init_empty_weights():
        model = Linears()
    bigmodel.load_checkpoint(model, tmp_path)
    assert spy.instances == [] and spy.outputs == []
    assert all(FileMappings().holds(p) for p in model.parameters())


def test_a_warm_converting_load_casts_on_torchs_threads_without_allocating_ahead(
    tmp_path, monkeypatch
):
    state = _saved(tmp_path, cold=False)
    spy = _Spy(monkeypatch)
    with bigmodel.init_empty_weights():
        model = Linears()
    bigmodel.load_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert spy.instances == []
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name].to(torch.bfloat16)), name


def test_outputs_allocated_ahead_never_exceed_the_bound_and_a_larger_one_still_comes(monkeypatch):
    made: list[AllocateAhead] = []
    counts = []  # outputs allocated and not taken, each time one more is allocated
    real_populate = allocate_module.populate_private

    def populate(tensor):  # runs after each allocation, before it is handed over
        counts.append(made[0].pending + 1)
        return real_populate(tensor)

    monkeypatch.setattr(allocate_module, "populate_private", populate)
    real_init = AllocateAhead.__init__
    monkeypatch.setattr(
        AllocateAhead,
        "__init__",
        lambda self, *a, **k: (made.append(self), real_init(self, *a, **k))[1],
    )
    specs = [(torch.Size([2048]), torch.bfloat16)] * 6 + [(torch.Size([8192]), torch.bfloat16)]
    specs.insert(3, None)  # a tensor the consumer makes itself
    ahead = AllocateAhead(specs, ahead_bytes=8192)  # two 4 KiB outputs
    deadline = time.monotonic() + 10
    while ahead.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.001)  # the thread runs ahead up to the bound
    outputs = [ahead.take(i) for i in range(len(specs))]
    assert outputs[3] is None
    assert [o.numel() for o in outputs if o is not None] == [2048] * 6 + [8192]
    assert len(counts) == 7 and max(counts[:6]) == 2  # never a third 4 KiB output
    assert ahead.peak_pending == 16384  # the 16 KiB output, alone and next: above the bound
    ahead.cancel()
    assert _allocate_threads() == set()


def test_a_converting_load_keeps_what_is_allocated_ahead_within_inflight_bytes(
    tmp_path, monkeypatch
):
    _saved(tmp_path)
    spy = _Spy(monkeypatch)
    with bigmodel.init_empty_weights():
        model = Linears()
    bound = 3 * 64 * 64 * 2  # three of the 8 KiB bf16 weights
    bigmodel.load_checkpoint(
        model, tmp_path, dtype=torch.bfloat16, io=IOOptions(inflight_bytes=bound)
    )
    assert 0 < spy.instances[0].peak_pending <= bound


def test_a_failing_load_frees_what_it_allocated_ahead_and_stops_its_threads(tmp_path, monkeypatch):
    _saved(tmp_path)
    spy = _Spy(monkeypatch)
    before = _allocate_threads()
    real_place, calls = reading_module.place, []

    def place(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk gone")  # the load fails with outputs allocated ahead
        real_place(*args)

    monkeypatch.setattr(reading_module, "place", place)
    with bigmodel.init_empty_weights():
        model = Linears()
    with pytest.raises(OSError, match="disk gone"):
        bigmodel.load_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert _allocate_threads() <= before
    assert spy.instances[0].pending == 0
    del model
    gc.collect()
    assert len(spy.outputs) > 2  # it had run ahead of the failure
    # every output freed: those not taken were held only by the AllocateAhead (still alive)
    assert all(ref() is None for ref in spy.outputs)


def test_the_casts_run_on_the_cores_left_beside_the_background_threads(tmp_path, monkeypatch):
    _saved(tmp_path)
    before = torch.get_num_threads()
    seen = []
    real_place = reading_module.place
    monkeypatch.setattr(
        reading_module, "place", lambda *a: (seen.append(torch.get_num_threads()), real_place(*a))
    )
    with bigmodel.init_empty_weights():
        model = Linears()
    bigmodel.load_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    cores = len(os.sched_getaffinity(0))
    assert set(seen) == {max(1, min(before, cores - 2))}
    assert torch.get_num_threads() == before  # restored


def test_populating_an_output_maps_its_whole_pages_and_keeps_its_content():
    tensor = torch.arange(10_000, dtype=torch.int32)
    copy = tensor.clone()
    covered = populate_private(tensor)
    assert 0 < covered <= tensor.numel() * 4 and covered % os.sysconf("SC_PAGE_SIZE") == 0
    assert torch.equal(tensor, copy)
    assert populate_private(torch.empty(0)) == 0
