"""accelerate's ``init_empty_weights`` and ``init_on_device``, on bigmodel's empty construction
(:mod:`bigmodel.placement.empty`).

accelerate's ``include_buffers=None`` reads the ``ACCELERATE_INIT_INCLUDE_BUFFERS`` environment
variable (default off), as accelerate does. Differs from accelerate: with
``include_buffers=True`` only persistent buffers leave for the target device; non-persistent
buffers (rotary ``inv_freq``, position ids) keep the values the model's code computed, since no
checkpoint holds them and accelerate leaves them empty on ``meta``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from bigmodel.placement import empty

__all__ = ["init_empty_weights", "init_on_device"]

_TRUE = {"1", "y", "yes", "t", "true", "on"}


def _include_buffers(value: bool | None) -> bool:
    if value is not None:
        return value
    return os.environ.get("ACCELERATE_INIT_INCLUDE_BUFFERS", "").strip().lower() in _TRUE


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Build modules with their parameters on ``meta``: no memory, no initialisation."""
    with empty.init_empty_weights(include_buffers=_include_buffers(include_buffers)):
        yield


@contextlib.contextmanager
def init_on_device(
    device: torch.device | str | int, include_buffers: bool | None = None
) -> Iterator[None]:
    """Build modules with their parameters (and persistent buffers if ``include_buffers``) on
    ``device``."""
    with empty.init_on_device(device, include_buffers=_include_buffers(include_buffers)):
        yield
