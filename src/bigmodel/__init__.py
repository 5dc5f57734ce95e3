"""bigmodel: save, load and instantiate very large PyTorch models with minimal RAM.

Checkpoints use the Hugging Face layout (``model.safetensors`` or sharded shards plus
``model.safetensors.index.json``) and are readable by transformers, accelerate,
huggingface_hub and safetensors.

The public names are imported on first use (PEP 562), so that ``import bigmodel`` and the
command line do not pay for ``import torch`` where no tensor is made (``bigmodel inspect``,
``bigmodel verify``); type checkers and IDEs see the imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigmodel.api.checkpoints import CheckpointManager
    from bigmodel.api.dcp import dcp_to_hf, hf_to_dcp
    from bigmodel.api.dispatch import dispatch_model
    from bigmodel.api.estimate import Estimate, estimate_memory
    from bigmodel.api.load import load_checkpoint, load_sharded_checkpoint
    from bigmodel.api.pretrained import PretrainedMixin, from_pretrained
    from bigmodel.api.save import save_checkpoint
    from bigmodel.checkpoint.handle import Checkpoint, TensorInfo, TensorSlice
    from bigmodel.checkpoint.open import open_checkpoint
    from bigmodel.execution.background import SaveHandle, release_staging_memory
    from bigmodel.foundations.errors import (
        BigModelError,
        CheckpointConflictError,
        CheckpointNotFoundError,
        CheckpointPermissionError,
        CheckpointWriteError,
        DistributedError,
        InvalidCheckpointError,
        KeyMappingError,
        KeyMismatchError,
        LoadStateDictError,
        MetaTensorError,
        MissingInitializerError,
        PlanError,
        Problem,
        RemoteError,
        UnsafeCheckpointError,
        UnsupportedTensorError,
    )
    from bigmodel.foundations.types import (
        DistributedOptions,
        IOOptions,
        LoadReport,
        MismatchedKey,
        OffloadOptions,
        RemoteOptions,
        SaveResult,
        ShardedLoadReport,
        VerifyResult,
    )
    from bigmodel.foundations.units import parse_size
    from bigmodel.placement.device_map import compute_module_sizes, infer_device_map
    from bigmodel.placement.empty import init_empty_weights, init_on_device

__version__ = "0.1.0"

#: Where each public name lives; imported by ``__getattr__`` on first access.
_LAZY: dict[str, str] = {
    "CheckpointManager": "bigmodel.api.checkpoints",
    "dcp_to_hf": "bigmodel.api.dcp",
    "hf_to_dcp": "bigmodel.api.dcp",
    "dispatch_model": "bigmodel.api.dispatch",
    "Estimate": "bigmodel.api.estimate",
    "estimate_memory": "bigmodel.api.estimate",
    "load_checkpoint": "bigmodel.api.load",
    "load_sharded_checkpoint": "bigmodel.api.load",
    "PretrainedMixin": "bigmodel.api.pretrained",
    "from_pretrained": "bigmodel.api.pretrained",
    "save_checkpoint": "bigmodel.api.save",
    "Checkpoint": "bigmodel.checkpoint.handle",
    "TensorInfo": "bigmodel.checkpoint.handle",
    "TensorSlice": "bigmodel.checkpoint.handle",
    "open_checkpoint": "bigmodel.checkpoint.open",
    "SaveHandle": "bigmodel.execution.background",
    "release_staging_memory": "bigmodel.execution.background",
    "BigModelError": "bigmodel.foundations.errors",
    "CheckpointConflictError": "bigmodel.foundations.errors",
    "CheckpointNotFoundError": "bigmodel.foundations.errors",
    "CheckpointPermissionError": "bigmodel.foundations.errors",
    "CheckpointWriteError": "bigmodel.foundations.errors",
    "DistributedError": "bigmodel.foundations.errors",
    "InvalidCheckpointError": "bigmodel.foundations.errors",
    "KeyMappingError": "bigmodel.foundations.errors",
    "KeyMismatchError": "bigmodel.foundations.errors",
    "LoadStateDictError": "bigmodel.foundations.errors",
    "MetaTensorError": "bigmodel.foundations.errors",
    "MissingInitializerError": "bigmodel.foundations.errors",
    "PlanError": "bigmodel.foundations.errors",
    "Problem": "bigmodel.foundations.errors",
    "RemoteError": "bigmodel.foundations.errors",
    "UnsafeCheckpointError": "bigmodel.foundations.errors",
    "UnsupportedTensorError": "bigmodel.foundations.errors",
    "DistributedOptions": "bigmodel.foundations.types",
    "IOOptions": "bigmodel.foundations.types",
    "LoadReport": "bigmodel.foundations.types",
    "MismatchedKey": "bigmodel.foundations.types",
    "OffloadOptions": "bigmodel.foundations.types",
    "RemoteOptions": "bigmodel.foundations.types",
    "SaveResult": "bigmodel.foundations.types",
    "ShardedLoadReport": "bigmodel.foundations.types",
    "VerifyResult": "bigmodel.foundations.types",
    "parse_size": "bigmodel.foundations.units",
    "compute_module_sizes": "bigmodel.placement.device_map",
    "infer_device_map": "bigmodel.placement.device_map",
    "init_empty_weights": "bigmodel.placement.empty",
    "init_on_device": "bigmodel.placement.empty",
}

__all__ = [
    "BigModelError",
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointWriteError",
    "DistributedError",
    "DistributedOptions",
    "Estimate",
    "IOOptions",
    "InvalidCheckpointError",
    "KeyMappingError",
    "KeyMismatchError",
    "LoadReport",
    "LoadStateDictError",
    "MetaTensorError",
    "MismatchedKey",
    "MissingInitializerError",
    "OffloadOptions",
    "PlanError",
    "PretrainedMixin",
    "Problem",
    "RemoteError",
    "RemoteOptions",
    "SaveHandle",
    "SaveResult",
    "ShardedLoadReport",
    "TensorInfo",
    "TensorSlice",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "VerifyResult",
    "__version__",
    "compute_module_sizes",
    "dcp_to_hf",
    "dispatch_model",
    "estimate_memory",
    "from_pretrained",
    "hf_to_dcp",
    "infer_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "open_checkpoint",
    "parse_size",
    "release_staging_memory",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's module on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
