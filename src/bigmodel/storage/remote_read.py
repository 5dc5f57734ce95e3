"""Reading tensors from remote files with concurrent byte-range requests, scheduled by bytes
in flight: the sibling of :mod:`bigmodel.storage.pread` for a URL.

Each tensor is split into requests of ``chunk_bytes`` served by a pool of threads (the client
releases the GIL for the whole request); requests are issued in the plan's order while the
bytes requested but not yet consumed stay within ``max_inflight_bytes`` (one tensor is always
allowed), so memory beyond the final model is the bound, not the file. Each chunk is copied
once, from the response into the tensor that is returned; nothing touches the disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from bigmodel.storage.remote import RemoteFolder

__all__ = ["RemoteRange", "remote_tensors"]


@dataclass(frozen=True)
class RemoteRange:
    """Where a tensor's bytes are in a remote file (a name under the folder), and what they hold."""

    key: str
    file: str
    begin: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_chunk(folder: RemoteFolder, file: str, out: torch.Tensor, offset: int) -> None:
    out.numpy()[:] = folder.read(file, offset, offset + out.numel())


def remote_tensors(
    folder: RemoteFolder,
    ranges: Iterable[RemoteRange],
    *,
    max_inflight_bytes: int = 256 * 2**20,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for each range, in order, read with concurrent range requests.

    At most ``max_inflight_bytes`` of tensors are requested ahead of the one the caller holds
    (one tensor is always allowed, whatever its size).
    """
    items = list(ranges)
    chunk = folder.options.chunk_bytes
    pool = ThreadPoolExecutor(
        max_workers=max(1, folder.options.threads), thread_name_prefix="bigmodel-remote"
    )
    pending: deque[tuple[RemoteRange, torch.Tensor, list[Future[None]]]] = deque()
    inflight = 0
    try:
        position = 0
        while position < len(items) or pending:
            while position < len(items) and (
                not pending or inflight + items[position].nbytes <= max_inflight_bytes
            ):
                item = items[position]
                out = torch.empty(item.nbytes, dtype=torch.uint8)
                futures = [
                    pool.submit(
                        _read_chunk,
                        folder,
                        item.file,
                        out[start : start + chunk],
                        item.begin + start,
                    )
                    for start in range(0, item.nbytes, chunk)
                ]
                pending.append((item, out, futures))
                inflight += item.nbytes
                position += 1
            item, out, futures = pending.popleft()
            for future in futures:
                future.result()
            inflight -= item.nbytes
            tensor = (
                out.view(item.dtype).view(item.shape)
                if item.nbytes
                else torch.empty(item.shape, dtype=item.dtype)
            )
            yield item.key, tensor
            del tensor, out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
