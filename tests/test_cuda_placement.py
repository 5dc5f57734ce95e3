"""GPU checks of the planner's conventions (issue 14): the room kept on the execution device
holds the streamed blocks, and a load on the GPU sets ``hf_device_map`` with integers.

    .venv/bin/python -m pytest -q -m cuda tests/test_cuda_placement.py   # seconds on one GPU

Left out of the default run (marker ``cuda``) and skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import bigmodel
from _models import LinearPair, Stack

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"
    ),
]

WIDTH = 512  # a layer holds 2 x 512 x 512 fp32 = 2 MiB
LAYER = 2 * WIDTH * WIDTH * 4


def _stack() -> Stack:
    """Twelve residual pairs of bias-free WIDTH x WIDTH Linears, held as ``layers.N``."""
    return Stack((LinearPair(WIDTH, residual=True) for _ in range(12)), name="layers")


@pytest.mark.parametrize("prefetch", [True, False])
def test_streaming_from_cpu_and_disk_stays_within_the_gpu_budget(tmp_path, prefetch):
    torch.manual_seed(0)
    source = _stack()
    bigmodel.save_checkpoint(source, tmp_path / "ckpt")
    budget = 8 * LAYER  # room for 8 layers resident, or fewer plus the streamed ones
    budgets = {0: budget, "cpu": 2 * LAYER, "disk": None}
    offload = bigmodel.OffloadOptions(prefetch=prefetch)
    with bigmodel.init_empty_weights():
        model = _stack()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bigmodel.load_checkpoint(
        model,
        tmp_path / "ckpt",
        device_map="auto",
        max_memory=budgets,
        offload=offload,
        offload_folder=tmp_path / "offload",
    )
    assert 0 in model.hf_device_map.values() and "disk" in model.hf_device_map.values()
    x = torch.randn(4, WIDTH)
    with torch.no_grad():
        out = model(x.cuda())
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    activations = 8 * 4 * WIDTH * 4  # a few (4, 512) fp32 tensors in flight
    assert peak <= budget + activations, (peak, budget, model.hf_device_map)
    with torch.no_grad():
        expected = source.cuda()(x.cuda())
    assert torch.equal(out, expected)
