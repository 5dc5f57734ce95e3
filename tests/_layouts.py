"""Checkpoint folders written by hand with the reference writers (safetensors, torch.save),
in the Hugging Face layout, for the tests that compare bigmodel with transformers/accelerate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bigmodel

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class Mlp(nn.Module):
    """Untied layers and a persistent buffer: every key of its state dict is stored."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))


def seeded_mlp(seed: int) -> Mlp:
    torch.manual_seed(seed)
    return Mlp()


def write_shards(
    state: dict[str, torch.Tensor], folder: Path, count: int, *, safe: bool = True
) -> dict[str, str]:
    """Hugging Face shard names written with the reference writers; returns the weight map."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per_shard = -(-len(keys) // count)
    weight_map: dict[str, str] = {}
    for i in range(count):
        chunk = {k: state[k].detach().clone() for k in keys[i * per_shard : (i + 1) * per_shard]}
        if safe:
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            save_file(chunk, folder / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin"
            torch.save(chunk, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    return weight_map


def write_index(folder: Path, index: Any, name: str = SAFE_INDEX) -> Path:
    path = folder / name
    path.write_text(index if isinstance(index, str) else json.dumps(index, indent=2))
    return path


def invalid(folder: Path) -> bigmodel.InvalidCheckpointError:
    with pytest.raises(bigmodel.InvalidCheckpointError) as info:
        bigmodel.open_checkpoint(folder)
    return info.value
