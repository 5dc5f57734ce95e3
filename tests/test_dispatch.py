import dataclasses

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyLM
from bigmodel.execution.offload import attach_offload_hooks
from bigmodel.execution.offload_sources import offload_state

IDS = torch.tensor([[1, 5, 7, 2, 39]])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyLM().eval()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt", max_shard_size=3000)
    return model, tmp_path / "ckpt"


def _empty() -> TinyLM:
    with bigmodel.init_empty_weights():
        return TinyLM().eval()


MAP = {
    "embed": "cpu",
    "layers.0": "cpu",
    "layers.1": "disk",
    "layers.2": "disk",
    "layers.3": "cpu",
    "layers.4": "disk",
    "layers.5": "disk",
    "norm": "disk",
    "head": "cpu",
}


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_cpu_and_disk_map_gives_the_outputs_of_the_in_memory_model(saved, prefetch):
    reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, device_map=MAP, offload=bigmodel.OffloadOptions(prefetch=prefetch)
    )
    assert model.layers[1].up.weight.is_meta  # not resident between forwards
    assert not model.layers[0].up.weight.is_meta
    with torch.no_grad():
        for _ in range(2):  # the second pass reads the weights again
            assert torch.equal(model(IDS), reference(IDS))
    assert model.layers[1].up.weight.is_meta and model.norm.weight.is_meta  # released after use


def test_disk_weights_that_need_a_new_dtype_are_converted_once_into_the_offload_folder(
    saved, tmp_path
):
    reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, device_map=MAP, dtype=torch.bfloat16, offload_folder=tmp_path / "offload"
    )
    files = sorted(p.name for p in (tmp_path / "offload").iterdir())
    assert (
        len(files) == 1
        and files[0].startswith("offload-bfloat16-")
        and files[0].endswith(".safetensors")
    )
    expected = reference.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected(IDS))


def test_an_auto_map_within_a_small_cpu_budget_offloads_the_rest_and_still_matches(saved):
    reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, device_map="auto", max_memory={"cpu": 4000, "disk": None}
    )
    on_disk = [n for n, p in model.named_parameters() if p.is_meta]
    assert on_disk, "the budget should have pushed some blocks to disk"
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))


def test_an_impossible_auto_map_says_what_to_change(saved):
    _, folder = saved
    with pytest.raises(bigmodel.PlanError, match="allow disk"):
        bigmodel.load_checkpoint(
            _empty(), folder, device_map="auto", max_memory={"cpu": 100, "disk": 0}
        )


def test_dispatch_model_offloads_an_already_loaded_model(saved, tmp_path):
    reference, folder = saved
    model = bigmodel.from_pretrained(TinyLM, folder)
    bigmodel.dispatch_model(model, MAP, offload_folder=tmp_path / "off")
    assert model.layers[2].down.weight.is_meta
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))


def test_offload_files_are_named_by_bigmodel_whatever_the_tensor_names(tmp_path):
    hostile = {"../../escape": torch.ones(2), "/etc/passwd": torch.zeros(3), "a\\b": torch.ones(1)}
    specs = offload_state(hostile, tmp_path / "off")
    assert [p.name for p in tmp_path.iterdir()] == ["off"]
    (only,) = list((tmp_path / "off").iterdir())
    assert only.name.startswith("offload-state-") and only.suffix == ".safetensors"
    for name, tensor in hostile.items():
        assert torch.equal(specs[name].load(), tensor)


def test_device_and_device_map_are_exclusive_and_bad_maps_are_explained(saved):
    _, folder = saved
    with pytest.raises(ValueError, match="either device= or device_map="):
        bigmodel.load_checkpoint(_empty(), folder, device="cpu", device_map={"": "cpu"})
    with pytest.raises(ValueError, match="places no entry over"):
        bigmodel.load_checkpoint(_empty(), folder, device_map={"embed": "cpu"})
    with pytest.raises(ValueError, match="pass 'auto'"):
        bigmodel.load_checkpoint(
            _empty(), folder, device_map="fastest"
        )  # "balanced" is accelerate's and plans


PROBE = """
import json, sys, torch
from torch import nn
import bigmodel
from bigmodel.foundations.memory import MemorySampler

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2048, 2048, bias=False)  # 16 MiB fp32
        self.v = nn.Linear(2048, 2048, bias=False)
    def forward(self, x):
        return x + self.v(torch.relu(self.w(x)))

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(12))  # 384 MiB
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x

folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
if sys.argv[3] == "save":
    torch.manual_seed(0)
    bigmodel.save_checkpoint(Model(), folder, max_shard_size="100MB", progress=False)
    raise SystemExit
with bigmodel.init_empty_weights():
    model = Model()
with MemorySampler(interval=0.001) as mem:
    bigmodel.load_checkpoint(model, folder, device_map="auto", max_memory={"cpu": "64MB", "disk": None}, dtype=dtype, offload_folder=sys.argv[3], progress=False)
    with torch.no_grad():
        model(torch.randn(4, 2048, dtype=dtype))
print(json.dumps({"anon": mem.increase("anon"), "block": 2 * 2048 * 2048 * dtype.itemsize}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """The 384 MiB checkpoint the budget tests load, saved once for both dtypes."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("offload") / "ckpt"
    subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), "float32", "save"], check=True, timeout=300
    )
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_disk_offloaded_model_keeps_its_cpu_budget(big_checkpoint, tmp_path, dtype):
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(big_checkpoint), dtype, str(tmp_path / "off")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # budget + the block that runs + the one prefetched + a small constant; the model is 384 MiB.
    assert m["anon"] < 64e6 + 2 * m["block"] + 32e6, m


def test_a_whole_model_on_disk_is_one_entry_and_still_runs(saved):
    reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map={"": "disk"})
    assert all(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))


# -- prefetch bound, tied sources, placement ------------------------------------------------------
def _entries_in_flight_while_running(model, names):
    """For each module name, the entries read ahead when that module starts running."""
    offloader = model._bigmodel_offloader
    seen = {}

    def record(name):
        def hook(mod, args):
            seen.setdefault(name, offloader.in_flight())  # returns None: inputs unchanged

        return hook

    for name in names:
        model.get_submodule(name).register_forward_pre_hook(record(name))
    return seen


DISK_LAYERS = {
    "embed": "cpu",
    **{f"layers.{i}": "disk" for i in range(6)},
    "norm": "cpu",
    "head": "cpu",
}


@pytest.mark.parametrize(
    ("prefetch", "ahead"),
    [(False, 0), (True, 1), (1, 0), ("1MB", 4)],
    ids=["off", "default-one-entry", "one-byte", "whole-model"],
)
def test_prefetch_reads_ahead_only_as_many_bytes_as_its_bound(saved, prefetch, ahead):
    reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(
        model, folder, device_map=DISK_LAYERS, offload=bigmodel.OffloadOptions(prefetch=prefetch)
    )
    offloader = model._bigmodel_offloader
    block = offloader.entry_bytes[0]
    assert offloader.entry_bytes == [block] * 6
    seen = _entries_in_flight_while_running(model, ["layers.1.down"])
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))
    # when layers.1 runs, the entries after it that are in flight fit within the bound
    in_flight = [k for k in seen["layers.1.down"] if k != "layers.1"]
    assert len(in_flight) == ahead, in_flight
    assert in_flight == [f"layers.{i}" for i in range(2, 2 + ahead)]
    assert offloader.in_flight() == []  # everything read ahead was used


class TiedPair(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.first = nn.Linear(width, width, bias=False)
        self.second = nn.Linear(width, width, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.pair = TiedPair()

    def forward(self, x):
        return self.pair(self.a(x))


def test_tied_weights_read_ahead_together_are_materialised_once(tmp_path):
    torch.manual_seed(0)
    reference = TwoStage().eval()
    state = reference.state_dict(keep_vars=True)
    specs = offload_state(state, tmp_path)
    loads = {}

    def counted(name, spec):
        def load():
            loads[name] = loads.get(name, 0) + 1
            return spec.load()

        return dataclasses.replace(spec, load=load)

    specs = {n: counted(n, s) for n, s in specs.items()}
    model = TwoStage().eval()
    attach_offload_hooks(model, specs, {"a": "disk", "pair": "disk"})
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # the pair's entry was read ahead while `a` ran: its one stored weight was read once
    assert loads["pair.first.weight"] + loads.get("pair.second.weight", 0) == 1, loads


def test_a_map_that_stays_on_the_cpu_adds_no_placement_hooks(saved):
    _, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map=MAP)
    assert model._bigmodel_placement_hooks == []
    assert not any(p.is_meta for n, p in model.named_parameters() if n.startswith("layers.0"))


def test_the_execution_device_is_the_first_accelerator_by_index_and_never_disk():
    from bigmodel.placement.device_map import execution_device

    assert execution_device({"a": "cuda:10", "b": "cuda:2", "c": "disk"}) == "cuda:2"
    assert execution_device({"a": "cpu", "b": "disk"}) == "cpu"
    assert execution_device({"a": "cuda:1"}, main_device=0) == "cuda:0"
    with pytest.raises(ValueError, match="cannot run on disk"):
        execution_device({"a": "cpu"}, main_device="disk")


def test_inputs_and_outputs_keep_their_container_types_when_moved():
    from collections import namedtuple

    from bigmodel.execution.hooks import move_to

    Pair = namedtuple("Pair", "x y")
    moved = move_to({"p": Pair(torch.ones(1), [torch.zeros(1)])}, torch.device("cpu"))
    assert isinstance(moved["p"], Pair) and isinstance(moved["p"].y, list)


# -- plans from the planner, with tied weights, run as the in-memory model does ------------------
class TiedThrough(nn.Module):
    """An embedding tied into the first Linear of a Sequential, small modules between big ones."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(64, 32)  # 8192 B
        self.enc = nn.Sequential(
            nn.Linear(32, 64),  # weight tied to shared: its bias, 256 B
            nn.LayerNorm(64),  # 512 B
            nn.Linear(64, 64),  # 16640 B
            nn.Linear(64, 64),
        )
        self.enc[0].weight = self.shared.weight
        self.out = nn.Linear(64, 8)  # 2080 B

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.shared(ids)))


@pytest.mark.parametrize(
    ("build", "cpu", "expected"),
    [
        # the tie group (embedding and enc.0) fits on the cpu, the big Linears do not
        (
            TiedThrough,
            20000,
            {
                "shared": "cpu",
                "enc.0": "cpu",
                "enc.1": "cpu",
                "enc.2": "disk",
                "enc.3": "disk",
                "out": "cpu",
            },
        ),
        # the tie group goes to disk together; the small modules between still fill the cpu
        (
            TiedThrough,
            5000,
            {
                "shared": "disk",
                "enc.0": "disk",
                "enc.1": "cpu",
                "enc.2": "disk",
                "enc.3": "disk",
                "out": "cpu",
            },
        ),
        # a head tied to an embedding on disk goes to disk with it; the norm fills the cpu
        (TinyLM, 2000, {"embed": "disk", "layers": "disk", "norm": "cpu", "head": "disk"}),
    ],
    ids=["tie-on-cpu", "tie-on-disk", "head-on-disk"],
)
def test_a_planned_map_with_tied_weights_gives_the_outputs_of_the_in_memory_model(
    tmp_path, build, cpu, expected
):
    torch.manual_seed(0)
    reference = build().eval()
    bigmodel.save_checkpoint(reference, tmp_path / "ckpt", max_shard_size=5000)
    with bigmodel.init_empty_weights():
        model = build().eval()
    budgets = {"cpu": cpu, "disk": None}
    plan = bigmodel.infer_device_map(model, max_memory=budgets)
    assert plan == expected
    bigmodel.load_checkpoint(model, tmp_path / "ckpt", device_map=plan)
    ids = torch.tensor([[1, 5, 7, 2, 39]])
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids), reference(ids))
    resident = {id(t): t for t in model.state_dict(keep_vars=True).values() if not t.is_meta}
    assert sum(t.numel() * t.element_size() for t in resident.values()) <= cpu


def test_a_planned_map_of_a_tied_transformers_model_gives_its_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=2048,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    with bigmodel.init_empty_weights():
        model = GPT2LMHeadModel(config).eval()
    budgets = {"cpu": 300_000, "disk": None}  # less than the tied embedding (512 KiB)
    plan = bigmodel.infer_device_map(model, max_memory=budgets)
    assert plan["transformer.wte"] == plan["lm_head"] == "disk"
    assert plan["transformer.h.0"] == "cpu"
    bigmodel.load_checkpoint(model, tmp_path, device_map=plan)
    ids = torch.tensor([[1, 5, 7, 2, 39]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
