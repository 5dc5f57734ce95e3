"""Hugging Face file names: the single files, the indexes, the shards, and what a save owns.

Pure naming: nothing here touches the disk. The commit protocol learns these names through
:data:`HF_LAYOUT` (the storage layer knows no checkpoint names of its own).
"""

from __future__ import annotations

import re

from bigmodel.checkpoint.index import MAX_INDEX_SIZE
from bigmodel.storage.commit import Layout

__all__ = [
    "CONFIG_NAME",
    "HF_LAYOUT",
    "SAFE_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "discovery_order",
    "index_file_name",
    "is_weights_artifact",
    "shard_name",
]


SAFE_WEIGHTS_NAME = "model.safetensors"


SAFE_INDEX_NAME = "model.safetensors.index.json"


WEIGHTS_NAME = "pytorch_model.bin"


WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


#: The model configuration Hugging Face keeps beside the weights (not a weights artifact).
CONFIG_NAME = "config.json"


#: Files that belong to a checkpoint layout (ours or Hugging Face's). A save removes every one
#: of them that it did not write, so two layouts never coexist after a save.
_ARTIFACT_RE = re.compile(
    r"^(?:model(?:-\d{5}-of-\d{5})?\.safetensors|pytorch_model(?:-\d{5}-of-\d{5})?\.bin"
    r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$"
)


def is_weights_artifact(name: str) -> bool:
    """True for the standard weight and index file names of either format."""
    return _ARTIFACT_RE.match(name) is not None


def shard_name(index: int, count: int, *, safe: bool) -> str:
    """Hugging Face shard name: 1-based, zero-padded to 5; the bare name when there is one shard."""
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if count == 1:
        return f"{base}.{ext}"
    return f"{base}-{index + 1:05d}-of-{count:05d}.{ext}"


# -- discovery ---------------------------------------------------------------------------
def discovery_order(prefer_safe: bool) -> list[str]:
    """The entry points looked for in a folder, in order: safetensors first unless ``prefer_safe``
    is False. (transformers looks for ``model.safetensors`` before the index; bigmodel never
    lets a stale single file shadow a newer sharded save.)"""
    safe = [SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME]
    legacy = [WEIGHTS_INDEX_NAME, WEIGHTS_NAME]
    return safe + legacy if prefer_safe else legacy + safe


def index_file_name(count: int, *, safe: bool) -> str | None:
    """The index file of a save with ``count`` shards (None for a single file)."""
    if count <= 1:
        return None
    return SAFE_INDEX_NAME if safe else WEIGHTS_INDEX_NAME


#: The names the commit protocol protects and replaces (see :mod:`bigmodel.storage.commit`).
HF_LAYOUT = Layout(
    index_names=(SAFE_INDEX_NAME, WEIGHTS_INDEX_NAME),
    is_artifact=is_weights_artifact,
    max_index_bytes=MAX_INDEX_SIZE,
)
