"""Cold loads at the disk's rate: the mapped read made resident before a load returns, the
whole-read announcement (cold only), io="auto" by filesystem, the sequential readahead of
``get_tensor``, and what ``LoadReport`` says about the bytes read."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

import bigmodel
import bigmodel.execution.reading as reading_module
import bigmodel.storage.pread as pread_module
import bigmodel.storage.readahead as readahead_module
from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.storage.page_cache import evict, resident_bytes
from bigmodel.storage.pread import LOCAL_READ, NETWORK_READ, mapped_read_shape, pick_io
from bigmodel.storage.readahead import FileMappings, Populator, kernel_window
from conftest import spy_populators


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)


def _saved(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = Net()
    bigmodel.save_checkpoint(model, tmp_path, **kwargs)
    return model


def _evict(folder):
    for path in folder.glob("*.safetensors"):
        evict(path)


def _spans(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return ckpt.file_spans(ckpt.keys()), ckpt.total_size


def _populate_threads():
    return {t for t in threading.enumerate() if t.name == "bigmodel-populate" and t.is_alive()}


def test_the_default_load_returns_with_every_page_resident_and_keeps_zero_copy(tmp_path):
    _saved(tmp_path, max_shard_size="20KB")
    _evict(tmp_path)
    spans, total = _spans(tmp_path)
    before = _populate_threads()
    with bigmodel.init_empty_weights():
        model = Net()
    report = bigmodel.load_checkpoint(model, tmp_path)
    assert resident_bytes(spans) == total  # every planned byte is in the page cache
    maps = FileMappings()
    assert all(maps.holds(p) for p in model.parameters())  # views of the file: zero copy
    assert report.bytes_read == total and report.cached_bytes < total
    assert _populate_threads() <= before  # the load's own read is over


@pytest.mark.parametrize(
    ("cold", "small_window", "announced"),
    [
        (True, True, True),  # cold, the kernel reads 128 KiB per fault: announce the whole read
        (True, False, False),  # cold, large kernel windows: faults keep the queue full alone
        (False, True, False),  # warm: nothing to read, nothing announced
    ],
)
def test_the_whole_read_is_announced_only_when_cold_and_the_kernel_window_is_small(
    tmp_path, monkeypatch, cold, small_window, announced
):
    _saved(tmp_path, max_shard_size="20KB")
    _, total = _spans(tmp_path)
    monkeypatch.setattr(reading_module, "looks_cached", lambda s: not cold)
    monkeypatch.setattr(reading_module, "resident_bytes", lambda s: 0 if cold else total)
    monkeypatch.setattr(reading_module, "needs_announcing", lambda path: small_window)
    calls = []
    real = Checkpoint.readahead
    monkeypatch.setattr(
        Checkpoint, "readahead", lambda self, names: calls.append(list(names)) or real(self, names)
    )
    with bigmodel.init_empty_weights():
        model = Net()
    report = bigmodel.load_checkpoint(model, tmp_path)
    assert report.bytes_read == total
    if announced:
        assert len(calls) == 1 and sorted(calls[0]) == sorted(model.state_dict())
    else:
        assert calls == []
    assert report.cached_bytes == (0 if cold else total)


def test_io_auto_maps_every_filesystem_and_reads_network_ones_with_several_threads(
    monkeypatch, tmp_path
):
    assert mapped_read_shape(tmp_path) == LOCAL_READ  # this test's folder is on a local disk
    for magic, shape in (
        (0x6969, NETWORK_READ),  # nfs
        (0x65735546, NETWORK_READ),  # fuse
        (0xFF534D42, NETWORK_READ),  # cifs
        (0xEF53, LOCAL_READ),  # ext4
        (0x58465342, LOCAL_READ),  # xfs
        (0x01021994, LOCAL_READ),  # tmpfs
    ):
        monkeypatch.setattr(pread_module, "filesystem_magic", lambda path, m=magic: m)
        assert pick_io("auto", tmp_path) == "mmap", hex(magic)
        assert mapped_read_shape(tmp_path) == shape, hex(magic)
    assert pick_io("pread", tmp_path) == "pread"  # an explicit mode is kept


def test_a_cold_load_on_a_network_filesystem_stays_zero_copy_read_by_several_threads(
    tmp_path, monkeypatch
):
    state = _saved(tmp_path).state_dict()
    monkeypatch.setattr(pread_module, "filesystem_magic", lambda path: 0x6969)
    started = spy_populators(monkeypatch)
    _evict(tmp_path)
    with bigmodel.init_empty_weights():
        model = Net()
    report = bigmodel.load_checkpoint(model, tmp_path)
    assert [(k["threads"], k["chunk_bytes"]) for _, k in started] == [tuple(NETWORK_READ)]
    maps = FileMappings()
    assert all(maps.holds(p) for p in model.parameters())  # views of the files: no copy
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    assert report.bytes_read == sum(t.nbytes for t in state.values())


def test_io_pread_reads_into_private_memory_on_any_filesystem(tmp_path):
    _saved(tmp_path)
    with bigmodel.init_empty_weights():
        model = Net()
    report = bigmodel.load_checkpoint(model, tmp_path, io="pread")
    maps = FileMappings()
    assert not any(maps.holds(p) for p in model.parameters())
    assert report.bytes_read == sum(p.nbytes for p in model.state_dict().values())
    assert report.read_seconds > 0


def test_load_report_counts_exactly_the_tensor_bytes_read_and_a_rate(tmp_path):
    state = _saved(tmp_path).state_dict()
    total = sum(t.nbytes for t in state.values())
    for dtype in (None, torch.bfloat16):
        with bigmodel.init_empty_weights():
            model = Net()
        report = bigmodel.load_checkpoint(model, tmp_path, dtype=dtype)
        assert report.bytes_read == total  # stored bytes read, whatever the target dtype
        assert 0 < report.read_seconds <= report.seconds
        assert report.read_rate == pytest.approx(total / report.read_seconds)
        assert report.cached_bytes == total  # just written: warm


def test_an_offloaded_part_is_not_counted_as_read(tmp_path):
    state = _saved(tmp_path).state_dict()
    with bigmodel.init_empty_weights():
        model = Net()
    device_map = {
        "layers.0": "cpu",
        "layers.1": "cpu",
        "layers.2": "disk",
        "layers.3": "disk",
        "norm": "cpu",
    }
    report = bigmodel.load_checkpoint(
        model, tmp_path, device_map=device_map, offload_folder=tmp_path / "off"
    )
    on_cpu = sum(t.nbytes for k, t in state.items() if not k.startswith(("layers.2.", "layers.3.")))
    assert report.bytes_read == on_cpu
    assert sorted(report.offloaded_keys) == sorted(
        k for k in state if k.startswith(("layers.2.", "layers.3."))
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_converting_load_is_bit_exact_with_torch_casts(tmp_path, dtype):
    state = _saved(tmp_path, max_shard_size="20KB").state_dict()
    _evict(tmp_path)
    with bigmodel.init_empty_weights():
        model = Net()
    bigmodel.load_checkpoint(model, tmp_path, dtype=dtype)
    for name, value in model.state_dict().items():
        assert value.dtype == dtype
        assert torch.equal(value.view(torch.int16), state[name].to(dtype).view(torch.int16)), name


def test_a_cold_converting_load_casts_large_tensors_piece_by_piece_as_their_pages_come_in(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    state = {"big": torch.randn(64, 256), "small": torch.randn(8), "last": torch.randn(32, 256)}
    bigmodel.save_checkpoint(state, tmp_path)
    _evict(tmp_path)
    monkeypatch.setattr(reading_module, "STREAM_BYTES", 16 * 1024)  # 64 KiB "big": 4 pieces
    waits: list[tuple[int, int]] = []
    real = Populator.wait_prefix

    def spy(self, i, nbytes):
        waits.append((i, nbytes))
        real(self, i, nbytes)

    monkeypatch.setattr(Populator, "wait_prefix", spy)
    model = nn.Module()
    for name, value in state.items():
        model.register_parameter(name, nn.Parameter(torch.empty_like(value, device="meta")))
    bigmodel.load_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    order = {name: i for i, name in enumerate(sorted(state))}  # file order: by name here
    assert [n for i, n in waits if i == order["big"]] == [16384, 32768, 49152, 65536]
    assert [n for i, n in waits if i == order["last"]] == [16384, 32768]
    assert not any(i == order["small"] for i, _ in waits)  # small: handed out whole
    for name, value in model.state_dict().items():
        expected = state[name].to(torch.bfloat16).view(torch.int16)
        assert torch.equal(value.view(torch.int16), expected), name


def test_waiting_for_a_tensors_first_bytes_returns_once_the_pieces_holding_them_are_in(
    tmp_path, monkeypatch
):
    ckpt, views = _file_views(tmp_path, [1024, 8192])  # 4 KiB, then 32 KiB
    release = threading.Event()
    real = readahead_module._prefault_span
    read: list[int] = []

    def gated(begin, end):  # the last 16 KiB of the second tensor wait for the test
        if end > views[1].data_ptr() + 16384 + 4096:
            release.wait(10)
        real(begin, end)
        read.append(end)

    monkeypatch.setattr(readahead_module, "_prefault_span", gated)
    populator = Populator(views, chunk_bytes=4096, threads=2)
    populator.wait_prefix(1, 8192)  # returns while the gated pieces are still waiting
    assert not release.is_set()
    start = views[1].data_ptr()
    last_page_end = -(-(start + 8192) // 4096) * 4096
    pages = set(range(start - start % 4096 + 4096, last_page_end + 1, 4096))
    assert pages <= set(read)  # every page of the first 8 KiB is in
    release.set()
    populator.wait_prefix(1, views[1].nbytes)
    populator.join()
    ckpt.close()


def test_a_failed_load_stops_its_background_read(tmp_path):
    _saved(tmp_path)
    _evict(tmp_path)  # cold: the read starts before the keys are matched
    before = _populate_threads()
    model = nn.Linear(3, 3)  # nothing matches: a strict load raises after the read started
    with pytest.raises(bigmodel.KeyMismatchError):
        bigmodel.load_checkpoint(model, tmp_path)
    assert _populate_threads() <= before


def _file_views(tmp_path, sizes):
    state = {f"t{i:02d}": torch.full((n,), float(i)) for i, n in enumerate(sizes)}
    bigmodel.save_checkpoint(state, tmp_path)
    ckpt = bigmodel.open_checkpoint(tmp_path)
    return ckpt, [ckpt.get_tensor(k, readahead=False) for k in sorted(state)]


@pytest.mark.parametrize("threads", [1, 3])
def test_the_populator_never_reads_further_ahead_of_its_consumer_than_its_bound(
    tmp_path, monkeypatch, threads
):
    ckpt, views = _file_views(tmp_path, [1024] * 8)  # 4 KiB each
    seen = []
    real = Populator._claim

    def spy(self):
        k = real(self)
        if k is not None:
            i = self._pieces[k][0]
            seen.append((i, self._wanted, self._before[i] - self._before[self._wanted]))
        return k

    monkeypatch.setattr(Populator, "_claim", spy)
    populator = Populator(views, ahead_bytes=8192, threads=threads)
    for i in range(len(views)):
        populator.wait(i)
    populator.join()
    assert sorted({i for i, _, _ in seen}) == list(range(8))  # every tensor read
    assert all(i <= wanted or pending <= 8192 for i, wanted, pending in seen)
    ckpt.close()


def test_several_populate_threads_hand_out_each_tensor_only_once_all_its_pieces_are_in(
    tmp_path, monkeypatch
):
    ckpt, views = _file_views(tmp_path, [4096] * 6)  # 16 KiB each: several 4 KiB pieces
    finished: list[tuple[int, int]] = []  # (begin, end) of each piece, as it completes
    real = readahead_module._prefault_span

    def slow(begin, end):
        real(begin, end)
        finished.append((begin, end))

    monkeypatch.setattr(readahead_module, "_prefault_span", slow)
    populator = Populator(views, chunk_bytes=4096, threads=3)
    for i, view in enumerate(views):
        populator.wait(i)
        first = view.data_ptr() - view.data_ptr() % 4096
        last = view.data_ptr() + view.nbytes
        covered = sum(
            min(e, last) - max(b, first) for b, e in list(finished) if b < last and e > first
        )
        assert covered >= last - first  # every page of tensor i was read before it was handed out
    populator.join()
    assert len(finished) == len(populator._pieces)  # each piece read once, by one thread
    ckpt.close()


def test_reading_every_tensor_in_file_order_reads_ahead_and_a_jump_stops_it(tmp_path, monkeypatch):
    started = spy_populators(monkeypatch)
    ckpt, _ = _file_views(tmp_path, [1024] * 6)
    names = ckpt.file_order()
    ckpt.get_tensor(names[0])
    assert started == []  # one tensor says nothing about the pattern
    ckpt.get_tensor(names[1])
    # sequential: the rest is read ahead from the second tensor on
    assert [n for n, _ in started] == [5]
    follower = ckpt._sequential
    assert follower._populator is not None and follower._mode == 0
    ckpt.get_tensor(names[4])  # a jump: reading ahead stops
    assert follower._populator is None
    ckpt.close()


def test_a_single_get_tensor_starts_no_read_ahead(tmp_path):
    ckpt, _ = _file_views(tmp_path, [1024] * 4)
    ckpt.get_tensor(ckpt.file_order()[2])
    assert ckpt._sequential._populator is None
    ckpt.close()


def test_resident_bytes_counts_the_cached_pages_of_the_ranges_asked_for(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(64 * 4096))
    evict(path)
    assert resident_bytes({path: [(0, 64 * 4096)]}) == 0
    with open(path, "rb") as f:
        f.seek(8 * 4096)
        f.read(4 * 4096)
    got = resident_bytes({path: [(8 * 4096, 12 * 4096), (8 * 4096 + 100, 9 * 4096)]})
    assert got >= 4 * 4096 + (4096 - 100)  # the kernel may read a little more, never less
    assert resident_bytes({path: [(0, 64 * 4096)]}) >= 4 * 4096
    assert resident_bytes({tmp_path / "missing": [(0, 1)]}) is None


def test_the_kernel_window_is_read_from_the_backing_device(tmp_path):
    fake = tmp_path / "bdi"
    dev = os.stat(tmp_path).st_dev
    (fake / f"{os.major(dev)}:{os.minor(dev)}").mkdir(parents=True)
    (fake / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb").write_text("128\n")
    assert kernel_window(tmp_path, bdi_root=fake) == 128 * 1024
    assert kernel_window(tmp_path, bdi_root=tmp_path / "missing") is None
    assert readahead_module.LARGE_WINDOW > 128 * 1024


@pytest.mark.parametrize("cold", [True, False])
def test_a_warm_load_leaves_the_cached_pages_to_the_views_and_a_cold_one_reads_them_ahead(
    tmp_path, monkeypatch, cold
):
    _saved(tmp_path, max_shard_size="20KB")
    _, total = _spans(tmp_path)
    monkeypatch.setattr(reading_module, "looks_cached", lambda s: not cold)
    monkeypatch.setattr(reading_module, "resident_bytes", lambda s: 0 if cold else total)
    started = spy_populators(monkeypatch)
    with bigmodel.init_empty_weights():
        model = Net()
    bigmodel.load_checkpoint(model, tmp_path)
    assert [n for n, _ in started] == ([len(model.state_dict())] if cold else [])


def test_reading_every_key_in_the_index_order_reads_ahead_too(tmp_path):
    state = {f"t{i:02d}": torch.full((1024,), float(i)) for i in range(6)}
    bigmodel.save_checkpoint(state, tmp_path, max_shard_size="9KB")  # 2 tensors a shard
    with bigmodel.open_checkpoint(tmp_path) as ckpt:
        index_order = ckpt.stored_keys()
        ckpt._sequential._index()
        ckpt._sequential._orders = [ckpt.file_order()[::-1], index_order]  # force two orders
        ckpt._sequential._positions = [
            {n: i for i, n in enumerate(o)} for o in ckpt._sequential._orders
        ]
        ckpt._sequential._last = [-2, -2]
        for name in index_order[:3]:
            ckpt.get_tensor(name)
        assert ckpt._sequential._mode == 1 and ckpt._sequential._populator is not None


_EXIT_CHILD = textwrap.dedent(
    """
    import atexit, threading, time, torch
    from bigmodel.storage import readahead

    def slow_touch(begin, size):  # a torch operation in flight on the populate thread
        time.sleep(0.05)
        torch.ones(1000).sum()

    readahead._touch = slow_touch
    # atexit runs last-registered first: this runs after bigmodel's hook
    atexit.register(lambda: print("alive at exit:", any(
        t.name == "bigmodel-populate" and t.is_alive() for t in threading.enumerate())))
    tensors = [torch.zeros(2**20) for _ in range(64)]
    readahead.Populator(tensors, chunk_bytes=2**16)
    time.sleep(0.1)
    """
)


def test_a_process_exiting_while_a_populate_thread_runs_stops_it_before_torch_is_torn_down():
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "alive at exit: False" in done.stdout, done.stdout


def test_stop_populators_stops_and_joins_every_running_populator():
    release = threading.Event()
    tensors = [torch.zeros(2**16) for _ in range(8)]
    original = readahead_module._touch

    def blocked_touch(begin, size):
        release.wait(10)
        original(begin, size)

    readahead_module._touch = blocked_touch
    try:
        populators = [Populator(tensors), Populator(tensors, threads=3)]
        threading.Timer(0.05, release.set).start()
        readahead_module.stop_populators()
        assert not any(t.is_alive() for p in populators for t in p._threads)
    finally:
        readahead_module._touch = original


def test_a_sample_of_pages_tells_a_wholly_cached_checkpoint_from_a_partly_cached_one(tmp_path):
    from bigmodel.storage.page_cache import looks_cached

    mib = 2**20
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(16 * mib))
    spans = {path: [(0, mib), (12 * mib, 16 * mib)]}
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.pread(fd, 16 * mib, 0)  # every page cached
        assert looks_cached(spans)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead beyond what is read
        os.pread(fd, mib, 0)  # only the first range comes back
    finally:
        os.close(fd)
    if resident_bytes(spans) == 5 * mib:
        pytest.skip("this filesystem keeps every page (tmpfs?): nothing to tell apart")
    assert not looks_cached(spans)
