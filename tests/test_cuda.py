"""The CUDA paths, checked the first day a GPU is at hand (issue 14, "Accelerators").

    .venv/bin/python -m pytest -q -m cuda tests/test_cuda.py     # well under 5 minutes on one GPU

Left out of the default run (marker ``cuda``) and skipped when ``torch.cuda.is_available()`` is
false, so on a CPU machine the file is collected and every test reports a skip.

What runs here and nowhere else: an execution device ``cuda`` running modules kept on ``cpu``
and ``disk`` (the offload hooks' pinned-memory copies on a side stream, ``_copy``/``_Batch``
in ``execution/offload.py``, with and without prefetch), non-persistent buffers of such
modules reaching the GPU, direct-to-device loads (``load_checkpoint(device="cuda")``),
device maps naming the GPU as ``0`` or ``"cuda:0"``, ``dispatch_model``, an ``"auto"`` plan
with a GPU budget, and generation with a transformers model.

How results are compared with the in-memory model:

* **bit-exact** against the same model held whole on the GPU: the same kernels run on the same
  device, so where the weights come from must not change a single bit;
* **bit-exact** against the CPU for loads and dtype casts (copies, and fp32 → bf16 rounds to
  nearest-even on both devices);
* **allclose** (``atol=1e-5``, fp32) against the CPU model's outputs: CUDA's matmul kernels sum
  in another order than the CPU's, so only closeness is promised across devices.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"
    ),
]

#: The accelerator, as a torch device and as a device map names it (accelerate's integer).
DEVICE = torch.device("cuda", 0)
INDEX: int | str = 0

IDS = torch.tensor([[1, 5, 7, 2, 63, 30, 11, 4]])


def _net() -> TinyLM:
    """Width 256, six blocks with a non-persistent ``scale`` buffer (like rotary ``inv_freq``:
    not in the checkpoint, yet needed on the execution device), an untied bias-free head."""
    return TinyLM(width=256, layers=6, vocab=64, tie=False, scale=True)


def _map() -> dict[str, int | str]:
    """GPU, CPU and disk entries interleaved, so every kind of hand-over happens."""
    return {
        "embed": INDEX,
        "layers.0": "cpu",
        "layers.1": "disk",
        "layers.2": INDEX,
        "layers.3": "cpu",
        "layers.4": "disk",
        "layers.5": "disk",
        "norm": "cpu",
        "head": INDEX,
    }


@pytest.fixture
def saved(tmp_path):
    """The in-memory CPU model, the same model on the GPU, and its checkpoint."""
    torch.manual_seed(0)
    model = _net().eval()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt", max_shard_size="300KB")
    on_gpu = copy.deepcopy(model).to(DEVICE)
    return model, on_gpu, tmp_path / "ckpt"


def _empty() -> TinyLM:
    with bigmodel.init_empty_weights():
        return _net().eval()


def _on_gpu_reference(on_gpu: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return on_gpu(ids.to(DEVICE)).cpu()


def _cpu_reference(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_direct_to_gpu_load_holds_the_bytes_of_a_cpu_load(saved, dtype):
    _, _, folder = saved
    on_cpu, on_gpu = _empty(), _empty()
    bigmodel.load_checkpoint(on_cpu, folder, dtype=dtype)
    bigmodel.load_checkpoint(on_gpu, folder, dtype=dtype, device=DEVICE)
    gpu_state = on_gpu.state_dict()
    for name, tensor in on_cpu.state_dict().items():
        assert gpu_state[name].device == DEVICE, name
        assert torch.equal(gpu_state[name].cpu(), tensor), name  # bit-exact: copies and casts


def test_a_direct_to_gpu_load_brings_non_persistent_buffers_and_runs_there(saved):
    reference, on_gpu_reference, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device=DEVICE)
    for name, buffer in model.named_buffers():  # not in the checkpoint, built on the CPU
        assert buffer.device == DEVICE, name
    with torch.no_grad():
        out = model(IDS.to(DEVICE)).cpu()
    assert torch.equal(out, _on_gpu_reference(on_gpu_reference))
    torch.testing.assert_close(out, _cpu_reference(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device_map", [0, "cuda:0", {"": 0}, {"": "cuda:0"}], ids=repr)
def test_a_device_map_naming_the_gpu_as_0_or_cuda_0_puts_every_tensor_there(saved, device_map):
    _, on_gpu, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map=device_map)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device == DEVICE, name
    with torch.no_grad():
        out = model(IDS)  # CPU inputs: moved in, and the outputs come back to the CPU
    assert out.device == IDS.device
    assert torch.equal(out, _on_gpu_reference(on_gpu))


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_cpu_and_disk_blocks_run_on_the_gpu_bit_exactly_as_the_model_held_there(saved, prefetch):
    reference, on_gpu, folder = saved
    model = _empty()
    options = bigmodel.OffloadOptions(prefetch=prefetch)
    bigmodel.load_checkpoint(model, folder, device_map=_map(), offload=options)
    expected = _on_gpu_reference(on_gpu)
    with torch.no_grad():
        for _ in range(3):  # later passes copy the weights in again
            out = model(IDS)
            assert out.device == IDS.device
            assert torch.equal(out, expected)  # same kernels, same device: bit-exact
    torch.testing.assert_close(out, _cpu_reference(reference), atol=1e-5, rtol=1e-5)
    assert model.layers[2].up.weight.device == DEVICE  # resident on the GPU
    for name in ("layers.0", "layers.1", "norm"):  # cpu and disk entries: released after use
        weights = model.get_submodule(name).parameters()
        assert all(p.is_meta for p in weights), f"{name} still holds its weights"


def test_gpu_inputs_give_gpu_outputs_and_a_batch_of_prompts_matches(saved):
    _, on_gpu, folder = saved
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map=_map())
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids.to(DEVICE))
    assert out.device == DEVICE
    assert torch.equal(out.cpu(), _on_gpu_reference(on_gpu, ids))


def _largest_entry_bytes(model: nn.Module, device_map: dict[str, int | str]) -> int:
    sizes = []
    for key, device in device_map.items():
        if device in ("cpu", "disk"):
            module = model.get_submodule(key)
            sizes.append(sum(p.numel() * p.element_size() for p in module.parameters()))
    return max(sizes)


def test_streamed_weights_leave_the_gpu_after_each_forward_and_stay_within_the_prefetch_bound(
    saved,
):
    _, _, folder = saved
    reference_sizes = _net()  # real tensors, for the byte counts
    largest = _largest_entry_bytes(reference_sizes, _map())
    model = _empty()
    bigmodel.load_checkpoint(model, folder, device_map=_map())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    with torch.no_grad():
        for _ in range(2):
            model(IDS)
    torch.cuda.synchronize()
    # nothing streamed stays behind (only the returned output, on the CPU)
    assert torch.cuda.memory_allocated(DEVICE) - before <= 64 << 10
    # the running entry plus one entry read ahead (the default prefetch), plus activations
    peak = torch.cuda.max_memory_allocated(DEVICE) - before
    assert peak <= 2 * largest + (1 << 20), (peak, largest)


def test_dispatch_model_places_a_loaded_model_on_the_gpu_the_cpu_and_disk(saved, tmp_path):
    reference, on_gpu, _ = saved
    model = copy.deepcopy(reference)
    bigmodel.dispatch_model(model, _map(), offload_folder=tmp_path / "offload")
    with torch.no_grad():
        assert torch.equal(model(IDS), _on_gpu_reference(on_gpu))
    assert model.embed.weight.device == DEVICE
    assert all(p.is_meta for p in model.layers[4].parameters())


def test_an_auto_plan_with_a_small_gpu_budget_keeps_the_weights_on_the_gpu_within_it(saved):
    _, on_gpu, folder = saved
    # a block is 1.05 MB: room for the streamed block and one read ahead, and a little more
    budget = 3_000_000
    model = _empty()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEVICE)
    bigmodel.load_checkpoint(
        model,
        folder,
        device_map="auto",
        max_memory={INDEX: budget, "cpu": 1_500_000, "disk": None},
    )
    torch.cuda.reset_peak_memory_stats(DEVICE)
    with torch.no_grad():
        out = model(IDS)
    assert torch.equal(out, _on_gpu_reference(on_gpu))
    assert any(p.device == DEVICE for p in model.parameters())  # the plan used the GPU
    # resident weights and the streamed block together keep the GPU budget (issue 14, point 3);
    # activations of this tiny batch are a few KB
    peak = torch.cuda.max_memory_allocated(DEVICE) - before
    assert peak <= budget + (256 << 10), peak


def _tiny_llama(tmp_path, tie: bool):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(tie=tie)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    return config, model, tmp_path / "llama"


def _greedy(model: nn.Module, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transformers_llama_generates_the_same_tokens_offloaded_as_held_on_the_gpu(
    tmp_path, dtype
):
    from transformers import LlamaForCausalLM

    config, _, folder = _tiny_llama(tmp_path, tie=False)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",  # a non-persistent inv_freq buffer
        "model.layers.0": INDEX,
        "model.layers.1": "disk",
        "model.norm": "disk",
        "lm_head": INDEX,
    }
    model = bigmodel.from_pretrained(
        lambda: LlamaForCausalLM(config), folder, dtype=dtype, device_map=device_map
    )
    # transformers' own load is the reference: it keeps the rotary buffer in fp32 as bigmodel does
    held = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE).eval()
    ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        expected = held(ids.to(DEVICE)).logits.cpu()
    assert torch.equal(logits, expected)
    assert _greedy(model, ids) == _greedy(held, ids.to(DEVICE))


def test_a_tied_llama_planned_auto_over_gpu_cpu_and_disk_generates_the_gpu_tokens(tmp_path):
    from transformers import LlamaForCausalLM

    config, reference, folder = _tiny_llama(tmp_path, tie=True)
    # a decoder layer is 37 KB, the tied embedding 16 KB: the planner (on a CPU machine) puts the
    # tie group on the CPU, the layers on disk, and the final norm and rotary embedding on the
    # GPU, keeping room there for the streamed layers
    budgets = {INDEX: "80KB", "cpu": "40KB", "disk": None}
    model = bigmodel.from_pretrained(
        lambda: LlamaForCausalLM(config),
        folder,
        device_map="auto",
        max_memory=budgets,
    )
    placed = {"gpu" if str(d) in ("0", "cuda:0") else str(d) for d in model.hf_device_map.values()}
    assert placed == {"gpu", "cpu", "disk"}, model.hf_device_map  # all three in use
    held = reference.to(DEVICE)
    ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert _greedy(model, ids) == _greedy(held, ids.to(DEVICE))
