"""Kernel readahead: ask the kernel to read byte ranges of files into the page cache, in the
background, so that later accesses find them cached instead of faulting page by page.

A hint only (``posix_fadvise(POSIX_FADV_WILLNEED)``): errors are ignored, and platforms
without ``posix_fadvise`` do nothing. Called "readahead" throughout bigmodel; "prefetch" is
reserved for the offload hooks reading the next device-map entries ahead of the forward pass.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["merge_ranges", "readahead"]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (begin, end) spans: overlapping or touching ranges become one."""
    out: list[tuple[int, int]] = []
    for begin, end in sorted(ranges):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def _advise(spans: dict[Path, list[tuple[int, int]]]) -> None:
    for path, ranges in spans.items():
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                for begin, end in ranges:
                    os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def readahead(spans: dict[Path, list[tuple[int, int]]]) -> int:
    """Start kernel readahead of each file's (begin, end) byte ranges from a background thread.

    Returns the number of bytes advised (after merging), at once; 0 where the platform lacks
    ``posix_fadvise``.
    """
    if getattr(os, "posix_fadvise", None) is None:  # pragma: no cover - not Linux/BSD
        return 0
    merged = {path: merge_ranges(ranges) for path, ranges in spans.items() if ranges}
    if merged:
        threading.Thread(
            target=_advise, args=(merged,), name="bigmodel-readahead", daemon=True
        ).start()
    return sum(end - begin for ranges in merged.values() for begin, end in ranges)
