"""bigmodel: save, load and instantiate very large PyTorch models with minimal RAM.

Checkpoints use the Hugging Face layout (``model.safetensors`` or sharded shards plus
``model.safetensors.index.json``) and are readable by transformers, accelerate,
huggingface_hub and safetensors.
"""

from bigmodel.api.dcp import dcp_to_hf, hf_to_dcp
from bigmodel.api.dispatch import dispatch_model
from bigmodel.api.estimate import Estimate, estimate_memory
from bigmodel.api.load import load_checkpoint, load_sharded_checkpoint
from bigmodel.api.pretrained import PretrainedMixin, from_pretrained
from bigmodel.api.save import save_checkpoint
from bigmodel.checkpoint.handle import Checkpoint, TensorInfo, TensorSlice
from bigmodel.checkpoint.open import open_checkpoint
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
    UnsafeCheckpointError,
    UnsupportedTensorError,
)
from bigmodel.foundations.types import (
    DistributedOptions,
    IOOptions,
    LoadReport,
    MismatchedKey,
    OffloadOptions,
    SaveResult,
    ShardedLoadReport,
    VerifyResult,
)
from bigmodel.foundations.units import parse_size
from bigmodel.placement.device_map import compute_module_sizes, infer_device_map
from bigmodel.placement.empty import init_empty_weights, init_on_device

__version__ = "0.1.0"

__all__ = [
    "BigModelError",
    "Checkpoint",
    "CheckpointConflictError",
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
    "save_checkpoint",
]
