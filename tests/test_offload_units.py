"""Offload materialises per unit (block or device-map entry), not per owning module: modules
that read a child's weight without calling it run under disk and CPU offload, within the
memory bound of one block plus prefetch."""

import dataclasses
import resource
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import bigmodel
import bigmodel.execution.offload as offload_module
from _models import Stack
from bigmodel.execution.offload import attach_offload_hooks, unit_scopes
from bigmodel.execution.offload_sources import offload_state
from bigmodel.execution.residency import tensor_roles
from bigmodel.storage.readahead import FileMappings

WIDTH, VOCAB, LAYERS = 32, 50, 6


class Mixer(nn.Module):
    """Reads ``proj.weight`` without calling ``proj``, as Mamba's mixer reads ``dt_proj.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.gate = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.linear(x, self.proj.weight) * torch.sigmoid(self.gate(x))


class Net(nn.Module):
    """Blocks of mixers, and a head that computes ``hidden @ self.embed.weight.T``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Mixer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) @ self.embed.weight.T


IDS = torch.tensor([[1, 5, 7, 2, 49, 3]])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt", max_shard_size=20_000)
    with torch.no_grad():
        expected = model(IDS)
    return model, tmp_path / "ckpt", expected


def _empty() -> Net:
    with bigmodel.init_empty_weights():
        return Net().eval()


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


BLOCKS_ON_DISK = {"embed": "cpu", "layers": "disk", "norm": "cpu"}
SOME_BLOCKS_ON_DISK = {
    "embed": "cpu",
    "layers.0": "cpu",
    "layers.1": "disk",
    "layers.2": "disk",
    "layers.3": "cpu",
    "layers.4": "disk",
    "layers.5": "disk",
    "norm": "disk",
}


@pytest.mark.parametrize(
    "device_map",
    [{"": "disk"}, BLOCKS_ON_DISK, SOME_BLOCKS_ON_DISK],
    ids=["whole-model", "module-list", "cpu-and-disk"],
)
@pytest.mark.parametrize("prefetch", [True, False])
def test_a_parent_reading_a_child_weight_runs_bit_exactly_under_disk_offload(
    saved, device_map, prefetch
):
    _, folder, expected = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, device_map=device_map, offload=bigmodel.OffloadOptions(prefetch=prefetch)
    )
    assert model.layers[1].proj.weight.is_meta
    for _ in range(2):  # the second pass reads every unit again
        assert torch.equal(_run(model), expected)
    assert model.layers[1].proj.weight.is_meta  # released after use
    assert model._bigmodel_offloader.in_flight() == []


def test_dispatch_model_runs_a_parent_reading_a_child_weight_under_cpu_and_disk_offload(
    saved, tmp_path
):
    _, folder, expected = saved
    model = bigmodel.from_pretrained(Net, folder).eval()
    bigmodel.dispatch_model(model, SOME_BLOCKS_ON_DISK, offload_folder=tmp_path / "off")
    assert model.layers[2].proj.weight.is_meta and not model.layers[0].proj.weight.is_meta
    assert torch.equal(_run(model), expected)


def test_a_head_reading_the_embedding_weight_directly_runs_with_the_embedding_on_disk(saved):
    _, folder, expected = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map={"": "disk", "layers": "cpu"})
    assert model.embed.weight.is_meta and not model.layers[0].proj.weight.is_meta
    assert torch.equal(_run(model), expected)
    assert model.embed.weight.is_meta


def test_a_whole_model_on_disk_is_materialised_one_block_at_a_time(saved):
    _, folder, expected = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map={"": "disk"})
    offloader = model._bigmodel_offloader
    scopes = [unit.scope for unit in offloader.units]
    assert scopes == ["", *(f"layers.{i}" for i in range(LAYERS))]
    root, *blocks = offloader.entry_bytes
    assert root == (VOCAB * WIDTH + 2 * WIDTH) * 4  # embedding and norm, for the whole forward
    assert _run(model).equal(expected)
    # the root's tensors, the block that runs and the one read ahead; never the whole model
    assert offloader.peak_bytes <= root + max(blocks) + offloader.prefetch_bytes
    assert offloader.peak_bytes < root + sum(blocks)
    assert offloader.resident_bytes == 0


def test_a_module_list_on_disk_holds_at_most_one_block_and_the_prefetch(saved):
    _, folder, expected = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map=BLOCKS_ON_DISK)
    offloader = model._bigmodel_offloader
    block = offloader.entry_bytes[0]
    assert offloader.entry_bytes == [block] * LAYERS
    assert _run(model).equal(expected)
    assert offloader.peak_bytes == block + offloader.prefetch_bytes == 2 * block


# -- the rule, re-entrancy, tied names, order ---------------------------------------------------


def test_the_scope_of_a_tensor_is_its_block_or_its_entry_module_or_the_first_called_module():
    model = _empty()
    names = [n for n, _ in model.named_parameters()]
    whole = unit_scopes(model, names, {"": "disk"})
    assert whole["embed.weight"] == whole["norm.bias"] == ""
    assert whole["layers.3.proj.weight"] == "layers.3"
    # an entry inside a block is materialised for the whole block's forward
    inner = unit_scopes(model, ["layers.2.proj.weight"], {"": "cpu", "layers.2.proj": "disk"})
    assert inner == {"layers.2.proj.weight": "layers.2"}
    # without blocks, a ModuleList entry is divided into the modules that are called
    flat = unit_scopes(model, ["layers.1.proj.weight"], {"layers": "disk"}, block_classes=[])
    assert flat == {"layers.1.proj.weight": "layers.1"}
    # an entry that names a tensor: its module
    assert unit_scopes(model, ["norm.weight"], {"": "cpu", "norm.weight": "disk"}) == {
        "norm.weight": "norm"
    }


class Recursive(nn.Module):
    """Calls itself (a unit entered again while materialised) and a shared module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
        x = self.shared(self.shared(self.lin(x)))
        return x if depth == 0 else self(x, depth - 1)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Recursive()
        self.head = nn.Linear(8, 8, bias=False)
        self.tail = nn.Linear(8, 8, bias=False)
        self.tail.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(self.inner(x)) + F.linear(x, self.tail.weight))


def _counted(specs):
    loads: dict[str, int] = {}

    def counted(name, spec):
        def load():
            loads[name] = loads.get(name, 0) + 1
            return spec.load()

        return dataclasses.replace(spec, load=load)

    return {n: counted(n, s) for n, s in specs.items()}, loads


def test_a_unit_entered_again_while_materialised_is_read_once_and_tied_names_share_one_tensor(
    tmp_path,
):
    torch.manual_seed(0)
    reference = Outer().eval()
    specs, loads = _counted(offload_state(reference.state_dict(keep_vars=True), tmp_path))
    model = Outer().eval()
    offloader = attach_offload_hooks(model, specs, {"": "disk", "inner": "disk"}, prefetch=False)
    assert offloader is not None
    assert [u.scope for u in offloader.units] == ["", "inner"]
    seen = {}

    def record(mod, args):
        seen.setdefault("tied", mod.weight is model.head.weight)

    model.tail.register_forward_pre_hook(record)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert seen["tied"]  # one Parameter for the tied names while their unit is in place
    # inner was entered three times (recursion) but read once; the tied head read once
    assert loads["inner.lin.weight"] == loads["inner.shared.weight"] == 1
    assert loads.get("head.weight", 0) + loads.get("tail.weight", 0) == 1
    assert model.inner.lin.weight.is_meta and model.head.weight.is_meta
    assert offloader.resident_bytes == 0


class Backwards(nn.Module):
    """Blocks registered in one order and run in the reverse order."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            x = block(x)
        return x


def test_prefetch_follows_the_order_units_ran_in_on_the_previous_forward(tmp_path):
    torch.manual_seed(0)
    reference = Backwards().eval()
    specs = offload_state(reference.state_dict(keep_vars=True), tmp_path)
    model = Backwards().eval()
    offloader = attach_offload_hooks(model, specs, {"": "disk"})
    assert offloader is not None
    seen: list[list[str]] = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: seen.append(offloader.in_flight()))
    x = torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
    # first forward: registration order guessed wrong (block 3 runs first, nothing next);
    # second forward: block 2, the one that really runs next, is read ahead
    assert seen == [[], ["blocks.2"]]
    assert offloader.in_flight() == []


# -- transformers' Mamba --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=4, state_size=4, expand=2
    )
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("mamba")
    model.save_pretrained(folder)
    ids = torch.tensor([[3, 17, 5, 42, 9]])
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    return transformers.MambaForCausalLM, config, folder, ids, logits, tokens


@pytest.mark.parametrize(
    "where",
    [
        {"device_map": {"": "disk"}},
        {
            "device_map": {
                "backbone.embeddings": "cpu",
                "backbone.layers": "disk",
                "backbone.norm_f": "cpu",
                "lm_head": "cpu",
            }
        },
        {"device_map": "auto", "max_memory": {"cpu": "20KB", "disk": None}},
    ],
    ids=["whole-model-on-disk", "layers-on-disk", "planned-tiny-cpu-budget"],
)
def test_transformers_mamba_gives_the_in_memory_logits_and_tokens_under_disk_offload(mamba, where):
    cls, config, folder, ids, logits, tokens = mamba
    with bigmodel.init_empty_weights():
        model = cls(config).eval()
    report = bigmodel.load_checkpoint(model, folder, **where)
    assert report.offloaded_keys
    assert model.backbone.layers[1].mixer.dt_proj.weight.is_meta
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)


# -- non-persistent buffers, resident CPU budget, reads ahead of use -----------------------------


def test_buffers_without_a_source_are_moved_to_an_accelerator_and_persistent_cpu_tensors_streamed():
    names = ["a.weight", "a.inv_freq", "b.weight", "b.inv_freq", "c.weight", "c.inv_freq"]
    device_map = {"a": "cuda:0", "b": "cpu", "c": "disk"}
    persistent = {"a.weight", "b.weight", "c.weight"}
    roles = tensor_roles(names, device_map, "cuda:0", offloaded={"c.weight"}, persistent=persistent)
    assert roles == {
        "a.weight": "stay",
        "a.inv_freq": "stay",
        "b.weight": "stream",
        "b.inv_freq": "move",
        "c.weight": "stream",
        "c.inv_freq": "move",
    }
    on_cpu = tensor_roles(names, device_map, "cpu", offloaded={"c.weight"}, persistent=persistent)
    assert on_cpu == {**dict.fromkeys(names, "stay"), "c.weight": "stream"}


class Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * torch.cat([self.inv_freq, self.inv_freq])


class TwoRotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Rotary() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))


def test_non_persistent_buffers_of_cpu_and_disk_modules_are_in_place_when_they_run(tmp_path):
    torch.manual_seed(0)
    reference = TwoRotary().eval()
    bigmodel.save_checkpoint(reference, tmp_path / "ckpt")
    model = TwoRotary().eval()
    bigmodel.load_checkpoint(
        model, tmp_path / "ckpt", device_map={"layers.0": "cpu", "layers.1": "disk"}
    )
    assert model.layers[1].lin.weight.is_meta and not model.layers[1].inv_freq.is_meta
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_the_cpu_budget_of_a_disk_offloaded_load_gets_private_memory_and_only_then(saved):
    _, folder, expected = saved
    offloaded = _empty()
    bigmodel.load_checkpoint(offloaded, folder, device_map=SOME_BLOCKS_ON_DISK)
    in_memory = _empty()
    bigmodel.load_checkpoint(in_memory, folder, device_map={"": "cpu"})
    mappings = FileMappings()
    assert not mappings.holds(offloaded.layers[0].proj.weight)  # resident: not page cache
    assert not mappings.holds(offloaded.embed.weight)
    assert mappings.holds(in_memory.layers[0].proj.weight)  # zero copy without disk offload
    assert torch.equal(_run(offloaded), expected) and torch.equal(_run(in_memory), expected)


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1024, 1024, bias=False)  # 4 MiB: 1024 pages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _big_stack() -> Stack:
    return Stack(Big() for _ in range(3))


@pytest.mark.parametrize("prefetch", [True, False])
def test_disk_weights_are_read_before_their_block_computes_not_page_by_page_during(
    tmp_path, monkeypatch, prefetch
):
    torch.manual_seed(0)
    reference = _big_stack().eval()
    bigmodel.save_checkpoint(reference, tmp_path / "ckpt")
    with bigmodel.init_empty_weights():
        model = _big_stack().eval()
    bigmodel.load_checkpoint(
        model,
        tmp_path / "ckpt",
        device_map={"": "disk"},
        offload=bigmodel.OffloadOptions(prefetch=prefetch),
    )
    events: list[tuple[str, object]] = []
    real = offload_module.prefault

    def spy(tensors):
        events.append(("read", threading.current_thread().name))
        return real(tensors)

    monkeypatch.setattr(offload_module, "prefault", spy)
    faults: list[int] = []

    def start(mod, args):
        events.append(("compute", None))
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt)

    def stop(mod, args, out):
        faults[-1] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults[-1]

    for block in model.blocks:
        block.lin.register_forward_pre_hook(start)
        block.lin.register_forward_hook(stop)
    x = torch.randn(1, 1024)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # every block's weight was read in full before its compute: the first one when it ran,
    # the next ones by the prefetch thread while the block before them computed
    kinds = [kind for kind, _ in events]
    reads = [i for i, kind in enumerate(kinds) if kind == "read"]
    computes = [i for i, kind in enumerate(kinds) if kind == "compute"]
    assert len(reads) == len(computes) == 3
    assert all(read < compute for read, compute in zip(reads, computes, strict=True))
    threads = [where for kind, where in events if kind == "read"]
    expected = "bigmodel-prefetch" if prefetch else threading.current_thread().name
    assert all(t.startswith(expected) for t in threads[1:]), threads
    # each weight spans 1024 pages of the file mapping; computing on it faults none in
    assert max(faults) < 16, faults


# -- no_split_module_classes names the blocks ---------------------------------------------------


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Fused(nn.Module):
    """A block that appears once (so not a repeated block class) and reads a grandchild's
    weight without calling its module."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.gate = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.linear(x, self.inner.proj.weight) * torch.sigmoid(self.gate(x))


class Solo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fused = Fused()
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fused(self.embed(ids)))


@pytest.fixture
def solo(tmp_path):
    torch.manual_seed(0)
    model = Solo().eval()
    bigmodel.save_checkpoint(model, tmp_path / "solo")
    with torch.no_grad():
        expected = model(IDS)
    return tmp_path / "solo", expected


def _load_solo(folder, **kwargs) -> Solo:
    with bigmodel.init_empty_weights():
        model = Solo().eval()
    bigmodel.load_checkpoint(model, folder, **kwargs)
    return model


@pytest.mark.parametrize("block", [Fused, "Fused"], ids=["class", "name"])
def test_a_class_named_in_no_split_module_classes_is_one_unit_under_whole_model_disk_offload(
    solo, block
):
    folder, expected = solo
    model = _load_solo(folder, device_map={"": "disk"}, no_split_module_classes=[block])
    offloader = model._bigmodel_offloader
    assert [unit.scope for unit in offloader.units] == ["", "fused"]
    assert torch.equal(_run(model), expected)
    assert offloader.resident_bytes == 0 and model.fused.inner.proj.weight.is_meta


def test_a_no_split_block_holds_a_child_entry_so_its_parent_reads_the_child_weight(solo):
    folder, expected = solo
    device_map = {"": "cpu", "fused.inner": "disk"}
    plain = _load_solo(folder, device_map=device_map)  # inner is a unit of its own
    with pytest.raises(bigmodel.MetaTensorError, match=r"'fused\.inner\.proj\.weight'"):
        _run(plain)
    model = _load_solo(
        folder, device_map=device_map, no_split_module_classes=(c for c in [Fused])
    )  # any iterable: a generator is read by the planner and by the hooks
    assert [unit.scope for unit in model._bigmodel_offloader.units] == ["fused"]
    assert torch.equal(_run(model), expected)


def test_an_offload_source_describing_a_buffer_where_the_model_has_a_parameter_is_refused():
    from bigmodel.execution.offload import attach_offload_hooks
    from bigmodel.execution.offload_sources import OffloadedTensor

    model = nn.Linear(2, 2)
    wrong = OffloadedTensor(load=lambda: torch.zeros(2, 2), dtype=torch.float32, is_parameter=False)
    with pytest.raises(ValueError, match=r"'weight'.*a parameter.*describes a buffer"):
        attach_offload_hooks(model, {"weight": wrong}, {"": "disk"})
    assert isinstance(model.weight, nn.Parameter) and not model.weight.is_meta
