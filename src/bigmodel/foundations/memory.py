"""Process memory readings: private (anonymous) memory and mapped file pages, sampled."""

from __future__ import annotations

import threading
import time

import psutil

__all__ = ["MemorySampler", "memory_status"]


_STATUS_KEYS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def memory_status() -> dict[str, int]:
    """Current ``rss``, ``anon`` (RssAnon), ``file`` (RssFile) and ``shmem`` (RssShmem: shared
    memory such as /dev/shm files) in bytes.

    Linux reports the split in /proc/self/status; elsewhere ``anon`` is approximated by
    RSS minus shared pages (psutil) and ``shmem`` is 0.
    """
    try:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _STATUS_KEYS:
                    out[_STATUS_KEYS[key]] = int(value.split()[0]) * 1024
        if len(out) == len(_STATUS_KEYS):
            return out
    except OSError:
        pass
    info = psutil.Process().memory_info()
    shared = getattr(info, "shared", 0)
    return {"rss": info.rss, "anon": info.rss - shared, "file": shared, "shmem": 0}


class MemorySampler:
    """Sample :func:`memory_status` in a thread; ``peak`` and ``base`` hold the readings.

    Every ``interval`` seconds (5 ms by default: reading /proc contends with page faults, so
    faster sampling slows what it measures).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.base = memory_status()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in memory_status().items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def increase(self, key: str) -> int:
        """Peak minus the reading when the sampler was created."""
        return self.peak[key] - self.base[key]

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
