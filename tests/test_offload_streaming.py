"""Larger than memory: when the offloaded units cannot all stay in the page cache, a unit's
file pages are given back as soon as it ran and prefetch reads the next forward's first unit
during the end of this one; when they can stay cached, nothing is dropped and a warm forward
reads nothing. The room is read once, at dispatch, from MemAvailable and the memory cgroup."""

import mmap
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import bigmodel
import bigmodel.execution.offload as offload_module
from _models import Stack
from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import resident_sources
from bigmodel.storage.page_cache import page_cache_room
from bigmodel.storage.readahead import FileMappings, drop_pages, prefault

PAGE = mmap.PAGESIZE


def _present_pages(address: int, nbytes: int) -> int:
    """How many pages of [address, address + nbytes) are mapped in this process (pagemap)."""
    first, last = address // PAGE, (address + nbytes - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(entry >> 63 for entry in entries)


def _pages(tensor: torch.Tensor) -> int:
    return _present_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def _touched(tensor: torch.Tensor) -> int:
    """How many pages a tensor's data touches (65 for 256 KiB not aligned to a page)."""
    begin = tensor.data_ptr()
    return (begin + tensor.numel() * tensor.element_size() - 1) // PAGE - begin // PAGE + 1


class Big(nn.Module):
    """A block whose weight is followed in the file by a 4 MiB ``pad`` that stays on the CPU:
    the page cache may hold a file in large folios (128 KiB and more), and mapping a page maps
    its whole folio, so reading a unit maps the pages of a folio it shares with its neighbour;
    the pad keeps every folio from straddling two units."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(256, 256, bias=False)  # 256 KiB: 64 pages
        self.pad = nn.Linear(1024, 1024, bias=False)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _stack() -> Stack:
    return Stack(Big() for _ in range(3))


X = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def stack(tmp_path):
    torch.manual_seed(0)
    reference = _stack().eval()
    bigmodel.save_checkpoint(reference, tmp_path / "ckpt")
    with torch.no_grad():
        expected = reference(X)
    return tmp_path / "ckpt", expected


PADS_ON_CPU = {"": "disk", **{f"blocks.{i}.pad": "cpu" for i in range(3)}}


def _load(folder: Path, monkeypatch, room: int | None) -> Stack:
    monkeypatch.setattr(offload_module, "page_cache_room", lambda: room)
    with bigmodel.init_empty_weights():
        model = _stack().eval()
    bigmodel.load_checkpoint(model, folder, device_map=PADS_ON_CPU)
    return model


def _file_view(model: Stack, block: int) -> torch.Tensor:
    """The file-mapping view a block's weight is read from (the placeholder's source)."""
    return model._bigmodel_offloader.tensors[f"blocks.{block}.lin.weight"].load()


def test_the_pages_of_a_unit_that_ran_are_dropped_when_the_streamed_part_cannot_stay_cached(
    stack, monkeypatch
):
    folder, expected = stack
    model = _load(folder, monkeypatch, room=0)
    offloader = model._bigmodel_offloader
    assert offloader.streaming
    assert all(FileMappings().holds(_file_view(model, b)) for b in range(3))  # the premise
    for _ in range(3):
        with torch.no_grad():
            assert torch.equal(model(X), expected)
        # blocks 1 and 2 ran and were given back (but the two pages each shares with its
        # neighbours); block 0 is read ahead for the next forward
        assert offloader.in_flight() == ["blocks.0"]
        assert _pages(_file_view(model, 1)) <= 2 and _pages(_file_view(model, 2)) <= 2
        offloader._pending[0].result()  # the read ahead runs in the prefetch thread
        block = _file_view(model, 0)
        assert _pages(block) == _touched(block) >= 64
    assert model.blocks[1].lin.weight.is_meta


def test_nothing_is_dropped_or_read_across_forwards_when_the_page_cache_holds_every_unit(
    stack, monkeypatch
):
    folder, expected = stack
    offloaded = 3 * 256 * 256 * 4
    model = _load(folder, monkeypatch, room=offloaded + offloaded // 3)  # units + prefetch fit
    offloader = model._bigmodel_offloader
    assert not offloader.streaming
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    assert offloader.in_flight() == []
    views = [_file_view(model, b) for b in range(3)]
    assert [_pages(v) for v in views] == [_touched(v) for v in views]  # warm: still mapped


def test_an_unknown_room_keeps_the_pages(stack, monkeypatch):
    folder, expected = stack
    model = _load(folder, monkeypatch, room=None)
    assert not model._bigmodel_offloader.streaming
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_private_memory_streamed_under_the_constrained_rule_is_never_dropped(monkeypatch):
    """Dropping private pages would zero them: the next forward would compute on zeros."""
    monkeypatch.setattr(offload_module, "page_cache_room", lambda: 0)
    torch.manual_seed(0)
    reference = _stack().eval()
    with torch.no_grad():
        expected = reference(X)
    with bigmodel.init_empty_weights():
        model = _stack().eval()
    private = {
        k: nn.Parameter(v.detach().clone(), False)
        for k, v in reference.named_parameters()
        if ".lin." in k
    }
    specs = resident_sources(private)  # private memory as the source, as for an accelerator
    for i in range(3):
        model.blocks[i].pad = reference.blocks[i].pad
    offloader = attach_offload_hooks(model, specs, PADS_ON_CPU)
    assert offloader is not None and offloader.streaming
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(X), expected)


# -- drop_pages ----------------------------------------------------------------------------------


def test_drop_pages_unmaps_only_the_pages_a_tensor_covers_whole(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * (16 * PAGE // 256))  # 16 pages
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # as bigmodel maps
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    assert prefault([whole]) == 16 * PAGE
    assert _pages(whole) == 16
    # a tensor from the middle of page 2 to the middle of page 9: pages 3..8 are wholly its own
    part = whole[2 * PAGE + 100 : 9 * PAGE + 100]
    assert drop_pages([part]) == 6 * PAGE
    present = [_present_pages(whole.data_ptr() + i * PAGE, PAGE) for i in range(16)]
    assert present == [1] * 3 + [0] * 6 + [1] * 7
    # the data is the file's: reading the dropped pages maps them again
    assert bytes(part[:256].tolist()) == bytes(range(100, 256)) + bytes(range(100))
    assert drop_pages([whole[:100]]) == 0  # less than a page: nothing is wholly its own
    del whole, part


# -- page_cache_room -----------------------------------------------------------------------------


def _proc(tmp_path: Path, membership: str, available_kb: int = 8_000_000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
        f"MemAvailable:   {available_kb} kB\n"
    )
    (proc / "self" / "cgroup").write_text(membership)
    return proc


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_page_cache_room_is_the_v2_limit_less_what_is_charged_and_not_page_cache(tmp_path):
    root = tmp_path / "cgroup"
    _write(root, cgroup_controllers="cpu memory io\n")
    _write(root / "outer", memory_max="max\n", memory_current="900000000\n")
    group = root / "outer" / "bench"
    _write(group, memory_max="1500000000\n", memory_current="1400000000\n")
    (group / "memory.stat").write_text("anon 500000000\nfile 900000000\nshmem 0\n")
    proc = _proc(tmp_path, "0::/outer/bench\n")
    assert page_cache_room(proc=proc, cgroup_root=root) == 1_000_000_000
    # an ancestor's tighter limit counts too
    (root / "outer" / "memory.max").write_text("1200000000\n")
    (root / "outer" / "memory.stat").write_text("anon 800000000\nfile 100000000\n")
    assert page_cache_room(proc=proc, cgroup_root=root) == 400_000_000


def test_page_cache_room_reads_the_v1_hierarchical_limit(tmp_path):
    root = tmp_path / "cgroup"
    group = root / "memory" / "api" / "bench"
    _write(group, memory_limit_in_bytes="1500000000\n", memory_usage_in_bytes="1450000000\n")
    (group / "memory.stat").write_text(
        "cache 950000000\nrss 500000000\nhierarchical_memory_limit 1500000000\n"
        "total_cache 950000000\ntotal_rss 500000000\n"
    )
    proc = _proc(tmp_path, "12:memory:/api/bench\n11:pids:/\n")
    assert page_cache_room(proc=proc, cgroup_root=root) == 1_000_000_000


def test_page_cache_room_without_a_limit_is_mem_available(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "memory", memory_limit_in_bytes="9223372036854771712\n")
    _write(root / "memory", memory_usage_in_bytes="100\n")
    (root / "memory" / "memory.stat").write_text(
        "hierarchical_memory_limit 9223372036854771712\ntotal_cache 0\n"
    )
    proc = _proc(tmp_path, "12:memory:/\n", available_kb=2_000_000)
    assert page_cache_room(proc=proc, cgroup_root=root) == 2_048_000_000
    assert page_cache_room(proc=tmp_path / "nowhere", cgroup_root=root) is None
    assert page_cache_room() is not None  # this machine: Linux, /proc/meminfo


def test_the_first_offloaded_unit_is_read_while_the_resident_modules_before_it_compute(stack):
    folder, expected = stack
    with bigmodel.init_empty_weights():
        model = _stack().eval()
    device_map = {**PADS_ON_CPU, "": "cpu", "blocks.1.lin": "disk", "blocks.2.lin": "disk"}
    bigmodel.load_checkpoint(model, folder, device_map=device_map)
    offloader = model._bigmodel_offloader
    seen: list[list[str]] = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(offloader.in_flight()))
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(X), expected)
    assert seen == [["blocks.1"], ["blocks.1"]]  # from the first forward on
    assert offloader.in_flight() == []


def test_the_cpu_budget_copied_into_private_memory_leaves_its_file_pages_unmapped(stack):
    """The pages read to copy the resident part are not kept mapped: mapped pages are costly
    for the kernel to reclaim when the streamed units need the memory."""
    folder, expected = stack
    with bigmodel.init_empty_weights():
        model = _stack().eval()
    bigmodel.load_checkpoint(model, folder, device_map=PADS_ON_CPU)
    checkpoint = model._bigmodel_offloader.tensors["blocks.0.lin.weight"].load.func.__self__
    source = checkpoint.get_tensor("blocks.1.pad.weight")  # the file view the copy was made from
    assert FileMappings().holds(source) and not FileMappings().holds(model.blocks[1].pad.weight)
    assert _pages(source) <= 2  # but the pages shared with its neighbours
    assert torch.equal(model.blocks[1].pad.weight, source)
    with torch.no_grad():
        assert torch.equal(model(X), expected)
