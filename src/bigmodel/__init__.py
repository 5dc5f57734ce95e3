"""bigmodel: save, load and instantiate very large PyTorch models with minimal RAM.

Checkpoints use the Hugging Face layout (``model.safetensors`` or sharded shards plus
``model.safetensors.index.json``) and are readable by transformers, accelerate,
huggingface_hub and safetensors.
"""

from ._errors import (
    BigModelError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidCheckpointError,
    KeyMismatchError,
    Problem,
    UnsafeCheckpointError,
)
from ._units import parse_size
from .checkpoint import Checkpoint, TensorInfo, TensorSlice, open_checkpoint
from .load import LoadReport, load_sharded_checkpoint
from .save import SaveResult, UnsupportedTensorError, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BigModelError",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "InvalidCheckpointError",
    "KeyMismatchError",
    "LoadReport",
    "Problem",
    "SaveResult",
    "TensorInfo",
    "TensorSlice",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "__version__",
    "load_sharded_checkpoint",
    "open_checkpoint",
    "parse_size",
    "save_checkpoint",
]
