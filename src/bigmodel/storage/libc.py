"""The C library's functions that Python's ``os`` and ``mmap`` do not expose (``madvise`` on a
torch tensor's memory, ``mincore``, ``fallocate``, ``statfs``): looked up once, typed, and None
where there is no such function (not Linux, or an old libc), so each caller keeps one guard."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

__all__ = ["libc_function"]


def libc_function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any:
    """libc's ``name`` with these argument and result types (``errno`` kept for
    ``ctypes.get_errno``), or None where the platform is not Linux or libc lacks it."""
    if not sys.platform.startswith("linux"):  # pragma: no cover - not Linux
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - no such libc function
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
