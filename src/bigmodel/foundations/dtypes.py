"""The one dtype parser: the names users write for floating-point dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "is_auto", "parse_dtype"]

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


def is_auto(value: object) -> bool:
    """Whether ``value`` asks for the dtype the weights already have (``"auto"``)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def parse_dtype(
    value: str | torch.dtype | None, *, auto: torch.dtype | None = None
) -> torch.dtype | None:
    """A target dtype for floating-point tensors: ``"bf16"``, ``"BFloat16"``,
    ``"torch.float16"``, ``"half"``... or a ``torch.dtype``; ``None`` stays None (keep each
    tensor's dtype) and ``"auto"`` gives ``auto`` (what the caller resolved it to: the
    checkpoint's or the model config's dtype). An unknown name or a dtype that is not
    floating-point (integer and bool tensors always keep theirs) raises ``ValueError``."""
    if value is None:
        return None
    if is_auto(value):
        return auto
    dtype = value if isinstance(value, torch.dtype) else DTYPE_NAMES.get(_name(value))
    if dtype is None:
        raise ValueError(
            f"Unknown dtype {value!r}: use one of {', '.join(DTYPE_NAMES)} "
            "(any case, 'torch.' prefix allowed), 'auto', or a torch.dtype."
        )
    if not dtype.is_floating_point:
        raise ValueError(
            f"dtype={value!r} is not a floating-point dtype: a target dtype applies to "
            "floating-point tensors only (integer and bool tensors keep theirs). Fix: pass "
            "a floating-point dtype such as torch.bfloat16, or None to keep every dtype."
        )
    return dtype


def _name(value: object) -> str:
    return value.strip().lower().removeprefix("torch.") if isinstance(value, str) else ""
