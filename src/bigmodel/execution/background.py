"""Background saves: stage the tensors once, then write them on a worker thread.

A training loop changes its weights right after it asks for a save. :func:`submit` copies
every tensor the save reads into *staging memory* (one reusable buffer per process, pinned
when the tensors live on CUDA and copied on a side stream there), returns a
:class:`SaveHandle` as soon as that copy is done, and hands the copies to a worker thread
that runs the save's job (write, hash, fsync, commit: the same core as a synchronous save).

Rules that keep memory and the folder sane:

* **One save in flight.** A new :func:`submit` first waits for the previous save to finish,
  so staging memory is one buffer, reused between saves (grown when a larger state comes).
* **Staging once.** Tensors that are the same view of the same memory (tied weights) are
  copied once; non-contiguous tensors become contiguous copies; a cast to a smaller dtype
  (``dtype=torch.bfloat16`` of fp32 weights) is applied while staging, so staging holds what
  is written, never both dtypes. A cast to a larger dtype is applied while writing.
* **A bound.** When the staged bytes would exceed ``staging_memory``, nothing is staged: the
  call warns and blocks until the save is durable (the worker writes straight from the live
  tensors), so the caller may change them once it returns. Never a partial snapshot.
* **Exit.** The worker is a non-daemon thread: a process that returns from its main script
  or calls ``sys.exit`` with a save in flight finishes that save first. A process killed
  (``kill -9``, ``os._exit``) mid-save leaves the previous checkpoint, through the commit
  protocol (:mod:`bigmodel.storage.commit`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import torch

from bigmodel.foundations.log import logger

__all__ = [
    "SaveHandle",
    "Staging",
    "release_staging_memory",
    "staging_peak_bytes",
    "submit",
    "wait_for_saves",
]

T = TypeVar("T")

#: Staged tensors start at multiples of this many bytes (any dtype may view them; SIMD friendly).
_ALIGN = 64


class SaveHandle(Generic[T]):
    """A save running in the background; ``wait()`` gives its result or raises its error.

    ``staged()`` is True once the tensors were copied (the caller may change them);
    ``done()`` is True once the save is durable, or failed. ``wait(timeout)`` returns the
    result (a :class:`~bigmodel.SaveResult` for :func:`bigmodel.save_checkpoint`) or
    re-raises the worker's exception itself: same type, its traceback from the worker, with
    a note naming the folder. A timeout raises ``TimeoutError`` and leaves the save running.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._staged = threading.Event()
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        #: ``time.monotonic()`` when the handle was made and when the save finished (None: running)
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    @classmethod
    def completed(cls, directory: Path, result: T) -> SaveHandle[T]:
        """A handle for a save that already finished (a synchronous save)."""
        handle: SaveHandle[T] = cls(directory)
        handle._finish(result, None)
        return handle

    def __repr__(self) -> str:
        state = "failed" if self._error else "done" if self.done() else "writing"
        if not self.staged():
            state = "staging"
        return f"<SaveHandle {self.directory} {state}>"

    def staged(self) -> bool:
        """True once every tensor was copied: the caller may change them."""
        return self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Block until staging is done (or ``timeout`` seconds); True if it is."""
        return self._staged.wait(timeout)

    def done(self) -> bool:
        """True once the save is durable and committed, or has failed."""
        return self._done.is_set()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The worker's error (None if the save succeeded); waits like :meth:`wait`."""
        self._wait_done(timeout)
        return self._error

    def wait(self, timeout: float | None = None) -> T:
        """The save's result once it is durable; re-raises the worker's exception."""
        self._wait_done(timeout)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _wait_done(self, timeout: float | None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"The background save into {self.directory} is still running after {timeout} s; "
                "it continues. Fix: call wait() again, or wait(None) to block until it is durable."
            )

    # -- the worker's side ---------------------------------------------------------------
    def _set_staged(self) -> None:
        self._staged.set()

    def _finish(self, result: T | None, error: BaseException | None) -> None:
        if error is not None:
            error.add_note(f"(raised by the background save into {self.directory})")
        self._result, self._error = result, error
        self.finished_at = time.monotonic()
        self._staged.set()
        self._done.set()


@dataclass
class _Slot:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _staged_dtype(tensor: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """Stage in the cast dtype when it is smaller (staging holds what is written)."""
    if cast is not None and tensor.is_floating_point() and cast.itemsize < tensor.itemsize:
        return cast
    return tensor.dtype


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Two names with this key read the same bytes the same way: staged once."""
    return (
        tensor.device,
        tensor.data_ptr(),
        tensor.dtype,
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.is_conj(),
        tensor.is_neg(),
    )


class Staging:
    """The process's reusable staging buffer; ``bound`` caps its size (None: no cap)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.peak_bytes = 0

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def release(self) -> None:
        self._buffer = None

    @staticmethod
    def layout(
        tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None
    ) -> tuple[dict[str, _Slot], int]:
        """Where each tensor goes in the buffer; tied names share a slot. Returns the bytes used."""
        slots: dict[str, _Slot] = {}
        seen: dict[tuple[Any, ...], _Slot] = {}
        used = 0
        for name, tensor in tensors.items():
            key = _identity(tensor)
            slot = seen.get(key)
            if slot is None:
                dtype = _staged_dtype(tensor, cast)
                nbytes = tensor.numel() * dtype.itemsize
                slot = seen[key] = _Slot(dtype, tuple(tensor.shape), used, nbytes)
                used += -(-nbytes // _ALIGN) * _ALIGN
            slots[name] = slot
        return slots, used

    def _buffer_for(self, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.numel() < nbytes or buf.is_pinned() != pinned:
            self._buffer = buf = None  # the old buffer is freed before the new one is made
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            self._buffer = buf
        self.peak_bytes = max(self.peak_bytes, buf.numel())
        return buf

    def stage(
        self, tensors: Mapping[str, torch.Tensor], slots: dict[str, _Slot], used: int
    ) -> dict[str, torch.Tensor]:
        """Copy every tensor into its slot; the returned tensors are views of the buffer."""
        on_cuda = any(t.device.type == "cuda" for t in tensors.values())
        buf = self._buffer_for(used, pinned=on_cuda and torch.cuda.is_available())
        views: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        with _copy_stream(on_cuda) as non_blocking:
            for name, tensor in tensors.items():
                slot = slots[name]
                view = views.get(id(slot))
                if view is None:
                    raw = buf[slot.offset : slot.offset + slot.nbytes]
                    view = raw.view(slot.dtype).view(slot.shape)
                    view.copy_(tensor, non_blocking=non_blocking)
                    views[id(slot)] = view
                out[name] = view
        return out


@contextlib.contextmanager
def _copy_stream(on_cuda: bool) -> Iterator[bool]:
    """On CUDA: copy on a side stream that waits for the current one, and synchronise it
    before the caller goes on (its next kernels may change the tensors). Yields non_blocking."""
    if not on_cuda or not torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        yield False
        return
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # pragma: no cover
    stream.wait_stream(torch.cuda.current_stream())  # pragma: no cover
    with torch.cuda.stream(stream):  # pragma: no cover
        yield True
    stream.synchronize()  # pragma: no cover


_STAGING = Staging()
_LOCK = threading.Lock()
_IN_FLIGHT: list[SaveHandle[Any]] = []


def wait_for_saves() -> None:
    """Block until the background save in flight (if any) has finished; never raises."""
    for handle in list(_IN_FLIGHT):
        handle._done.wait()


def release_staging_memory() -> None:
    """Free the staging buffer once no save is in flight (the next save allocates it again)."""
    with _LOCK:
        wait_for_saves()
        _STAGING.release()


def staging_peak_bytes() -> int:
    """The largest staging buffer this process has held."""
    return _STAGING.peak_bytes


def _register_exit_hook() -> None:
    """Finish a save in flight at interpreter exit, before ``concurrent.futures`` shuts down.

    Exit joins non-daemon threads only after the ``threading`` exit hooks have run, and one of
    those makes every ``ThreadPoolExecutor`` refuse new work (the parallel shard writers).
    Those hooks run last-registered first: registered after ``concurrent.futures.thread`` is
    imported, this one waits for the save while the executors still accept work.
    """
    import concurrent.futures.thread  # noqa: F401 - registers its hook first

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(wait_for_saves)


_register_exit_hook()


def _run(handle: SaveHandle[T], job: Callable[[], T]) -> None:
    try:
        result = job()
    except BaseException as exc:
        logger.error("background save into %s failed: %r", handle.directory, exc)
        handle._finish(None, exc)
    else:
        handle._finish(result, None)
    finally:
        with contextlib.suppress(ValueError):
            _IN_FLIGHT.remove(handle)


def submit(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    job: Callable[[Mapping[str, torch.Tensor]], T],
    *,
    cast: torch.dtype | None = None,
    staging_memory: int | None = None,
    failed: Callable[[BaseException], NoReturn] | None = None,
) -> SaveHandle[T]:
    """Stage ``tensors`` and run ``job(staged)`` on a worker thread; see the module docstring.

    Waits for the previous background save first (one in flight). Returns once staging is
    done, or, when the state exceeds ``staging_memory``, once the save itself is done.

    ``failed`` (a collective save) turns a staging error into the worker's job: instead of
    raising here, the worker runs ``failed(error)``, which tells the other ranks (their
    workers wait for this one) and raises; the handle carries that error.
    """
    with _LOCK:
        wait_for_saves()
        handle: SaveHandle[T] = SaveHandle(directory)
        try:
            staged, fits = _stage(directory, tensors, cast, staging_memory)
            work: Callable[[], T] = lambda: job(staged)  # noqa: E731
        except Exception as exc:
            if failed is None:
                raise
            logger.error("staging the save into %s failed: %r", directory, exc)
            fits = True  # nothing to write from: the caller may change its tensors
            work = functools.partial(failed, exc)
        _IN_FLIGHT.append(handle)
        worker = threading.Thread(
            target=_run,
            args=(handle, work),
            name="bigmodel-background-save",
            daemon=False,  # joined at interpreter exit: a save in flight is finished
        )
        worker.start()
        if fits:
            handle._set_staged()
        else:
            handle._done.wait()
    return handle


def _stage(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    cast: torch.dtype | None,
    staging_memory: int | None,
) -> tuple[Mapping[str, torch.Tensor], bool]:
    """(what the worker writes from, whether it is a staged copy): over the bound, the live
    tensors themselves (with a warning), and the caller blocks until the save is durable."""
    slots, used = Staging.layout(tensors, cast)
    if staging_memory is None or used <= staging_memory:
        return _STAGING.stage(tensors, slots, used), True
    warnings.warn(
        f"The background save into {directory} needs {used} bytes of staging memory, more "
        f"than staging_memory={staging_memory}; it is written synchronously (the call "
        "returns once it is durable). Fix: raise staging_memory (or pass None).",
        stacklevel=4,
    )
    return tensors, False
