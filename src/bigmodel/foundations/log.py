"""The package logger. bigmodel never adds handlers; applications configure logging."""

from __future__ import annotations

import logging

logger = logging.getLogger("bigmodel")
