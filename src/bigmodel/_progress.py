"""Progress bars on work that takes seconds, silenced by a flag or an environment variable."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV_VAR", "progress_bar", "progress_enabled"]

#: Set to 1/true/yes to silence every bigmodel progress bar.
PROGRESS_ENV_VAR = "BIGMODEL_DISABLE_PROGRESS_BARS"


def progress_enabled(progress: bool | None) -> bool | None:
    """Resolve a ``progress=`` option to tqdm's ``disable`` semantics.

    ``True``/``False`` force bars on or off; ``None`` (the default) shows them only when
    stderr is a terminal and :data:`PROGRESS_ENV_VAR` is not set.
    """
    if os.environ.get(PROGRESS_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    return progress


def progress_bar(*, total: int, desc: str, progress: bool | None, unit: str = "B") -> tqdm[Any]:
    """A tqdm bar in bytes (or ``unit``) honouring :func:`progress_enabled`."""
    enabled = progress_enabled(progress)
    disable: bool | None = None if enabled is None else not enabled
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1000,
        disable=disable,
        leave=False,
    )
