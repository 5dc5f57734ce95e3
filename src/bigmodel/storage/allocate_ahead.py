"""Allocating a converting load's output tensors ahead, with their pages already mapped.

A converting CPU load (fp32 stored, bf16 wanted) writes every tensor into fresh private
memory. Large allocations come from ``mmap`` (glibc's threshold is at most 32 MiB), so every
page of every output is a page fault in which the kernel hands out a zeroed page: for a 1.5 GB
bf16 model that was ~0.3-0.4 s of the calling thread's time on 2 cores, as long as the cast
itself. :class:`AllocateAhead` moves those faults to a background thread that runs ahead of
the consumer (bounded by bytes, like the reads), while the consumer waits on the disk anyway:
the cast then writes into memory that is already mapped.

The outputs are plain ``torch.empty`` tensors (freed normally by torch); only their pages are
populated early (``MADV_POPULATE_WRITE`` over each allocation's page-aligned interior, Linux
5.14+, else one byte written per page), which changes no content. Bytes allocated and not yet
handed out never exceed ``ahead_bytes`` (beyond one tensor, when a single tensor is larger).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from bigmodel.storage.readahead import populate_private

__all__ = ["AllocateAhead"]


class AllocateAhead:
    """Allocate ``specs[i]`` = (shape, dtype) CPU tensors in order, from one background
    thread, each with its pages mapped, at most ``ahead_bytes`` ahead of :meth:`take`.

    ``None`` entries are skipped (tensors the consumer makes itself). :meth:`take` ``(i)``
    returns output ``i`` (waiting for it if needed) and hands it over: the consumer owns it.
    :meth:`cancel` stops the thread and drops what was allocated and not taken. Errors of the
    thread (an allocation that failed) are raised by :meth:`take`.
    """

    def __init__(
        self,
        specs: Sequence[tuple[torch.Size, torch.dtype] | None],
        *,
        ahead_bytes: int,
    ) -> None:
        self._specs = list(specs)
        self._sizes = [0 if s is None else s[0].numel() * s[1].itemsize for s in self._specs]
        self._ahead = ahead_bytes
        self._ready: dict[int, torch.Tensor] = {}  # allocated, not taken yet
        self._taken = 0  # the consumer asked for every index below this
        self._stop = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        #: Most bytes ever allocated and not yet taken (for tests and reports).
        self.peak_pending = 0
        self._thread = threading.Thread(target=self._run, name="bigmodel-allocate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i, spec in enumerate(self._specs):
                if spec is None:
                    continue
                if not self._room_for(i):
                    return
                out = torch.empty(spec[0], dtype=spec[1])
                populate_private(out)
                with self._cv:
                    if self._stop:
                        return
                    self._ready[i] = out
                    pending = sum(self._sizes[j] for j in self._ready)
                    self.peak_pending = max(self.peak_pending, pending)
                    self._cv.notify_all()
                del out
        except BaseException as exc:  # an allocation failed: the consumer raises it
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _room_for(self, i: int) -> bool:
        """Wait until output ``i`` fits within the bound (or is the next one taken); False if
        cancelled meanwhile."""
        with self._cv:
            while not self._stop and not (
                i <= self._taken
                or sum(self._sizes[j] for j in self._ready) + self._sizes[i] <= self._ahead
            ):
                self._cv.wait()
            return not self._stop

    def take(self, i: int) -> torch.Tensor | None:
        """Output ``i`` (None for a skipped entry), once allocated; the caller owns it."""
        if self._specs[i] is None:
            return None
        with self._cv:
            self._taken = max(self._taken, i)
            self._cv.notify_all()
            self._cv.wait_for(lambda: i in self._ready or self._error is not None or self._stop)
            if i not in self._ready:
                raise self._error or RuntimeError(f"output {i} was cancelled before it was taken")
            return self._ready.pop(i)

    def cancel(self) -> None:
        """Stop the thread and free every output allocated and not taken (the load is done,
        or failed); returns once the thread has stopped."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            self._ready.clear()

    @property
    def pending(self) -> int:
        """How many outputs are allocated and not taken."""
        with self._cv:
            return len(self._ready)
