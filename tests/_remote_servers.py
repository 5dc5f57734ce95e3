"""Real servers for the remote-checkpoint tests and benchmark: a threaded HTTP/1.1 server with
``Range`` support (and faults on demand) serving a folder, and moto's standalone S3 server.

The HTTP server is small on purpose: Python's ``http.server`` has no ``Range`` support, and the
faults the tests need (a dropped connection, a 500, a body cut mid-range, a lying
``Content-Length``) are easiest to inject in a server we own. Bodies go out with
``socket.sendfile``, so it serves gigabytes at localhost speed for the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """What the server does wrong, and what it saw. Counters count down per request."""

    #: the next N GETs answer 500
    status_500: int = 0
    #: the next N GETs answer 503 with Retry-After (throttling)
    status_503: int = 0
    #: the next N GETs close the connection without an answer
    drop: int = 0
    #: the next N GETs send headers for the whole range, then half the body, then close
    truncate: int = 0
    #: the next N GETs ignore their Range header and answer 200 with the whole file
    ignore_range: int = 0
    #: every HEAD announces this many bytes more than the file has (a wrong Content-Length)
    extra_length: int = 0
    #: every GET of these names answers this status
    fixed_status: dict[str, int] = field(default_factory=dict)
    #: seconds every GET waits before its body (so that concurrent requests overlap)
    delay: float = 0.0
    #: GETs being answered now, and the bytes they asked for; the most of each seen at once
    active: int = 0
    active_bytes: int = 0
    max_active: int = 0
    max_active_bytes: int = 0
    #: (method, path, Range header) of every request
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    #: the Authorization headers seen
    authorizations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> bool:
        """Consume one count of fault ``name``; True if this request gets it."""
        with self.lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    def begin(self, nbytes: int) -> None:
        with self.lock:
            self.active += 1
            self.active_bytes += nbytes
            self.max_active = max(self.max_active, self.active)
            self.max_active_bytes = max(self.max_active_bytes, self.active_bytes)

    def end(self, nbytes: int) -> None:
        with self.lock:
            self.active -= 1
            self.active_bytes -= nbytes

    def paths(self, method: str = "GET") -> list[str]:
        return [p for m, p, _ in self.requests if m == method]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        rel = unquote(self.path.split("?", 1)[0]).lstrip("/")
        target = (self.server.root / rel).resolve()
        if self.server.root not in target.parents or not target.is_file():
            return None
        return target

    def _record(self) -> None:
        faults = self.server.faults
        with faults.lock:
            faults.requests.append((self.command, self.path, self.headers.get("Range", "")))
            if "Authorization" in self.headers:
                faults.authorizations.append(self.headers["Authorization"])

    def _status_only(self, status: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._record()
        target = self._file()
        if target is None:
            self._status_only(404)
            return
        self.send_response(200)
        size = target.stat().st_size + self.server.faults.extra_length
        self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        self._record()
        faults = self.server.faults
        name = unquote(self.path.split("?", 1)[0]).rsplit("/", 1)[-1]
        if name in faults.fixed_status:
            self._status_only(faults.fixed_status[name])
            return
        if faults.take("drop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if faults.take("status_500"):
            self._status_only(500)
            return
        if faults.take("status_503"):
            self._status_only(503, {"Retry-After": "0"})
            return
        target = self._file()
        if target is None:
            self._status_only(404)
            return
        self._send_body(target, faults.take("truncate"))

    def _send_body(self, target: Path, truncate: bool) -> None:
        size = target.stat().st_size
        start, end = 0, size - 1
        match = _RANGE.match(self.headers.get("Range", ""))
        if self.server.faults.take("ignore_range"):
            match = None
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if start >= size:
                self._status_only(416, {"Content-Range": f"bytes */{size}"})
                return
        count = end - start + 1
        self.server.faults.begin(count)
        try:
            self._send_range(target, match is not None, start, end, size, truncate)
        finally:
            self.server.faults.end(count)

    def _send_range(
        self, target: Path, ranged: bool, start: int, end: int, size: int, truncate: bool
    ) -> None:
        count = end - start + 1
        if self.server.faults.delay:
            time.sleep(self.server.faults.delay)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(count))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.wfile.flush()
        with open(target, "rb") as fh:
            sent = count // 2 if truncate else count
            if sent:
                self.connection.sendfile(fh, start, sent)
        if truncate:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, root: Path, faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.faults = faults


@dataclass
class HttpServer:
    """A running server: ``url(name)`` is the address of ``root / name``."""

    root: Path
    base: str
    faults: Faults

    def url(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base


@contextlib.contextmanager
def http_server(root: Path, tls: tuple[Path, Path] | None = None) -> Iterator[HttpServer]:
    """Serve ``root`` over HTTP on a free localhost port, with byte ranges; over HTTPS with
    ``tls`` ((certificate, key) files)."""
    faults = Faults()
    server = _Server(root, faults)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield HttpServer(root, f"{scheme}://127.0.0.1:{server.server_address[1]}", faults)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by ``openssl`` (the caller skips when it
    is missing)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone S3 server on a free localhost port; yields its endpoint URL. Needs
    ``moto[server]``; the caller skips when it is missing."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_environment(endpoint: str) -> dict[str, str]:
    """Environment variables that point the S3 client at the local server (fake keys)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


def upload_folder(endpoint: str, bucket: str, prefix: str, folder: Path) -> None:
    """Create ``bucket`` on the server and put every file of ``folder`` under ``prefix/``."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing-key-id",
        aws_secret_access_key="testing-secret-key",
        region_name="us-east-1",
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}".lstrip("/"))


def free_env(keys: list[str]) -> dict[str, str | None]:
    """The current values of ``keys`` (to restore them)."""
    return {k: os.environ.get(k) for k in keys}
