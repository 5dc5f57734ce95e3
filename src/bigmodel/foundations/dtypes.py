"""The one dtype parser: the names users write for floating-point dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "parse_dtype"]

#: Accepted names (case-insensitive; a ``torch.`` prefix is allowed too: ``torch.bfloat16``).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"BFloat16"``, ``"torch.float16"``, ``"half"``, ... -> the ``torch.dtype``;
    a ``torch.dtype`` passes through. Anything else raises ``ValueError`` listing the accepted
    names (:data:`DTYPE_NAMES`)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ValueError(
        f"Unknown dtype {value!r}: use one of {', '.join(DTYPE_NAMES)} "
        "(any case, 'torch.' prefix allowed) or a torch.dtype."
    )
