"""Remote objects: sizes and byte ranges of files under a URL prefix (``https://``, ``s3://``...).

A :class:`RemoteFolder` is one prefix (``https://host/models/llama``, ``s3://bucket/llama``)
and reads the files directly under it by byte range. It knows no checkpoint names: the
checkpoint layer decides which names to ask for and checks that each is a plain file name, so
a name can never leave the prefix (the client also encodes each name as one path segment).

The client is obstore (a Rust object-store client; ``pip install bigmodel[remote]``): on
localhost it read ranges at about twice the throughput of fsspec/aiohttp for half the CPU (see
``docs/benchmarks/remote.md``), it speaks HTTP(S), S3, GCS and Azure with one API, and it takes
credentials from the usual environment of each service (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``).
It is imported on first use, so the core install does not need it.

Failures: the client retries transient ones itself (connection resets, 5xx, throttling) with
exponential backoff; a body cut short, or fewer bytes than asked, is retried here the same
way. What still fails raises a typed error naming the URL (credentials and query strings
removed) and the HTTP status: :class:`~bigmodel.CheckpointNotFoundError` (404),
:class:`~bigmodel.CheckpointPermissionError` (401/403), else :class:`RemoteError`.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from bigmodel.foundations.errors import (
    BigModelError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    RemoteError,
)
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import RemoteOptions
from bigmodel.storage.remote_http import DirectHttp, Segment

if TYPE_CHECKING:
    from bigmodel.storage.remote_cache import RemoteCache

__all__ = [
    "REMOTE_SCHEMES",
    "RemoteFolder",
    "RemotePath",
    "is_remote",
    "redact",
    "split_url",
]

#: URL schemes read through the remote client (``file://`` and plain paths are local).
REMOTE_SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_STATUS = re.compile(r"status code: (\d{3})")
_INSTALL = "pip install 'bigmodel[remote]'"


def is_remote(path: object) -> bool:
    """True for a string URL whose scheme the remote client reads (``https://``, ``s3://``...)."""
    if not isinstance(path, str):
        return False
    match = _SCHEME.match(path)
    return match is not None and match.group(1).lower() in REMOTE_SCHEMES


def redact(text: str) -> str:
    """``text`` with the credentials a URL can carry removed: ``user:password@`` and query
    strings (pre-signed URLs carry their signature there). Used for every URL shown."""
    text = re.sub(r"(://)[^/@\s]*@", r"\1", text)
    return re.sub(r"\?[^\s'\"]*", "?...", text)


def split_url(url: str) -> tuple[str, str]:
    """``(folder URL, file name)`` of a URL naming a file."""
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder, name


@dataclass(frozen=True)
class RemotePath:
    """Where a remote file or folder is, as a checkpoint shows it: ``str()`` is the URL with
    credentials removed; ``name`` its last segment."""

    url: str

    @property
    def name(self) -> str:
        return split_url(self.url)[1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(split_url(self.url)[0])

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    def __str__(self) -> str:
        return redact(self.url)


def _client() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError(
            f"Reading a checkpoint from a URL needs the optional remote client. Fix: {_INSTALL}."
        ) from None
    return obstore


class RemoteFolder:
    """The files directly under one URL prefix, read by byte range (see the module docstring)."""

    def __init__(self, url: str, options: RemoteOptions | None = None) -> None:
        self.url = url.rstrip("/")
        self.options = options or RemoteOptions()
        obstore = _client()
        from obstore.store import from_url

        opts = self.options
        retry: Any = {
            "max_retries": opts.retries,
            "backoff": {
                "init_backoff": timedelta(seconds=opts.backoff),
                "max_backoff": timedelta(seconds=opts.max_backoff),
                "base": 2,
            },
            "retry_timeout": timedelta(seconds=opts.timeout * (opts.retries + 1)),
        }
        client: Any = {"allow_http": True, "timeout": timedelta(seconds=opts.timeout)}
        try:
            self._store = from_url(self.url, client_options=client, retry_config=retry)
        except obstore.exceptions.BaseError as exc:
            raise RemoteError(
                redact(self.url),
                None,
                f"Cannot read from {redact(self.url)}: {_short(exc)}. Fix: check the URL and the "
                "client's environment (credentials, region, endpoint).",
            ) from None
        self._obstore = obstore
        #: Plain HTTP(S): range reads straight into the tensors (None elsewhere).
        self._direct = DirectHttp.for_url(self.url, opts.timeout)
        #: The local cache of this folder's files (None without ``cache_dir``).
        self.cache: RemoteCache | None = None
        if self.options.cache_dir is not None:
            from bigmodel.storage.remote_cache import RemoteCache

            self.cache = RemoteCache(self.options.cache_dir, redact(self.url))

    def close(self) -> None:
        """Drop what was kept of files that were not read whole (see the cache), and close
        idle connections."""
        if self.cache is not None:
            self.cache.close()
        if self._direct is not None:
            self._direct.close()

    @property
    def copies_responses(self) -> bool:
        """Whether range reads arrive in the client's own buffers (then copied), rather than
        straight into the destination (plain HTTP(S), see :meth:`read_into`)."""
        return self._direct is None or not self._direct.active

    def path(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    def size(self, name: str) -> int | None:
        """Bytes of file ``name`` (from its ``HEAD``), or None when there is no such file."""
        try:
            return int(self._call(name, lambda: self._obstore.head(self._store, name))["size"])
        except CheckpointNotFoundError:
            return None

    def read(self, name: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of ``name``: exactly that many, or the error after retries."""
        want = end - start
        if want <= 0:
            return memoryview(b"")
        for attempt in range(self.options.retries + 1):
            try:
                data = memoryview(
                    self._call(
                        name,
                        lambda: self._obstore.get_range(self._store, name, start=start, end=end),
                    )
                )
            except RemoteError as exc:
                if exc.status is not None or attempt == self.options.retries:
                    raise
                self._pause(name, attempt, str(exc))
                continue
            if len(data) == want:
                if self.cache is not None:
                    self.cache.store(name, start, data)
                return data
            if attempt == self.options.retries:
                raise RemoteError(
                    str(self.path(name)),
                    None,
                    f"{self.path(name)}: asked for bytes {start}-{end - 1} ({want} bytes) and got "
                    f"{len(data)}, {attempt + 1} times: the file is shorter than its size said, "
                    "or changed while it was read. Fix: check that the file is complete on the "
                    "server, and open the checkpoint again.",
                )
            self._pause(name, attempt, f"got {len(data)} of {want} bytes")
        raise AssertionError("unreachable")  # pragma: no cover

    def read_into(self, name: str, start: int, end: int, segments: list[Segment]) -> None:
        """Bytes ``[start, end)`` of ``name`` into ``segments`` ((file offset, memory), sorted,
        inside the range, not overlapping; the bytes between them are dropped). Over plain
        HTTP(S) the body is read straight into the memory (:mod:`bigmodel.storage.remote_http`);
        otherwise, or when that answer is not the expected one, the range is read by
        :meth:`read` (retries, typed errors) and copied."""
        direct = self._direct
        if direct is not None and direct.active:
            gaps = direct.read_into(name, start, end, segments)
            if gaps is not None:
                if self.cache is not None:
                    for at, memory in sorted([*segments, *gaps], key=lambda s: s[0]):
                        self.cache.store(name, at, memory)
                return
        import numpy as np

        data = self.read(name, start, end)
        for at, memory in segments:  # numpy copies without the GIL
            np.frombuffer(memory, dtype=np.uint8)[:] = np.frombuffer(
                data, dtype=np.uint8, count=len(memory), offset=at - start
            )

    def _pause(self, name: str, attempt: int, why: str) -> None:
        delay = min(self.options.max_backoff, self.options.backoff * 2**attempt)
        delay *= 0.5 + random.random() / 2
        logger.info("reading %s failed (%s); retrying in %.2fs", self.path(name), why, delay)
        time.sleep(delay)

    def _call(self, name: str, request: Any) -> Any:
        """Run one request; the client's errors become bigmodel's typed errors."""
        try:
            return request()
        except self._obstore.exceptions.BaseError as exc:
            raise _typed(str(self.path(name)), exc) from None
        except FileNotFoundError as exc:  # obstore's NotFoundError
            raise _typed(str(self.path(name)), exc) from None


def _short(exc: BaseException) -> str:
    """The client's message without its debug dump, credentials removed."""
    return redact(str(exc).split("\n\nDebug source", 1)[0].strip())


def _typed(url: str, exc: BaseException) -> BigModelError:
    """The bigmodel error for a failed request: not found, permission, or :class:`RemoteError`."""
    text = _short(exc)
    match = _STATUS.search(text)
    status = int(match.group(1)) if match else None
    if isinstance(exc, FileNotFoundError) or status == 404:
        return CheckpointNotFoundError(
            f"{url} does not exist (HTTP 404). Fix: check the URL; a checkpoint folder's URL "
            "ends with the folder, a file's with its name."
        )
    name = type(exc).__name__
    if status in (401, 403) or name in ("PermissionDeniedError", "UnauthenticatedError"):
        return CheckpointPermissionError(
            f"{url}: access denied (HTTP {status or 403}). Fix: set the credentials the client "
            "reads from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile "
            "for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://...)."
        )
    where = f"HTTP {status}" if status else "no complete answer"
    return RemoteError(
        url,
        status,
        f"{url}: the request failed ({where}) after the client's retries: {text}. Fix: check "
        "that the server is up and the URL is right; transient failures are retried, so this "
        "one persisted.",
    )
