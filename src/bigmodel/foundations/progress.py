"""Progress bars on work that takes seconds, silenced by a flag or an environment variable."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["PROGRESS_ENV_VAR", "ProgressBar", "progress_bar", "progress_enabled"]

#: Set to 1/true/yes to silence every bigmodel progress bar.
PROGRESS_ENV_VAR = "BIGMODEL_DISABLE_PROGRESS_BARS"


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a ``progress=`` option: ``True``/``False`` force bars on or off; ``None`` (the
    default) shows them only when stderr is a terminal. :data:`PROGRESS_ENV_VAR` wins over both."""
    if os.environ.get(PROGRESS_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    if progress is None:
        return sys.stderr is not None and sys.stderr.isatty()
    return progress


class ProgressBar:
    """The part of tqdm's interface bigmodel uses; a silent bar is this no-op itself.

    A silent bar never constructs tqdm: tqdm's instance registry takes a lock shared across
    forked processes, and a child killed while holding it would block every later bar.
    """

    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(*, total: int, desc: str, progress: bool | None, unit: str = "B") -> Any:
    """A tqdm bar in bytes (or ``unit``) if :func:`progress_enabled`, else a no-op bar."""
    if not progress_enabled(progress):
        return ProgressBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1000, leave=False
    )
