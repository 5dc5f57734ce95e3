"""A memory limit for one benchmark child: a cgroup that caps the process *and* its page cache.

A larger-than-memory benchmark needs a machine that is smaller than the model. A cgroup memory
limit charges both the process's private memory and the page cache it brings in, so a child
started inside one sees the pressure a small machine would put on it: mapped weights are
evicted and read again. Used by ``bench_offload.py``::

    reason = memory_cgroup.unavailable()
    if reason is None:
        with memory_cgroup.MemoryCgroup(1_500_000_000) as group:
            run_child(..., prefix=group.prefix())   # the child joins the group, then execs
            print(group.usage())

cgroup v2 (``memory.max``) is used when the unified hierarchy has the memory controller, else
cgroup v1 (``memory.limit_in_bytes``). v1 groups are made inside this process's own memory
group (so a container's limits still apply); v2 groups at the root of the hierarchy (v2 lets
only leaf groups hold processes). Needs root; :func:`unavailable` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["MemoryCgroup", "unavailable"]

ROOT = Path("/sys/fs/cgroup")


def _version() -> int | None:
    """2 or 1: which cgroup hierarchy holds the memory controller; None if neither does."""
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    if (ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    return None


def _own_v1_group() -> Path:
    """This process's v1 memory group (``/sys/fs/cgroup/memory/...``)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return ROOT / "memory" / path.lstrip("/")
    return ROOT / "memory"


def unavailable() -> str | None:
    """Why no memory cgroup can be made here (a sentence), or None when one can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (creating a cgroup needs root)"
    if _version() is None:
        return f"no cgroup memory controller under {ROOT}"
    try:  # a container may mount the hierarchy read-only or forbid the controller
        with MemoryCgroup(1 << 30):
            pass
    except OSError as error:
        return f"cannot create a memory cgroup ({error})"
    return None


class MemoryCgroup:
    """A fresh memory cgroup limited to ``limit`` bytes; removed on exit.

    ``prefix()`` is a command prefix that moves the started process into the group before it
    execs the real command, so every byte the command touches is charged to the group.
    """

    def __init__(self, limit: int, name: str | None = None) -> None:
        self.limit = limit
        self.version = _version()
        base = ROOT if self.version == 2 else _own_v1_group()
        self.path = base / (name or f"bigmodel-bench-{os.getpid()}-{time.monotonic_ns()}")

    def _write(self, leaf: str, value: str) -> None:
        (self.path / leaf).write_text(value)

    def __enter__(self) -> MemoryCgroup:
        if self.version == 2:
            control = ROOT / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
        self.path.mkdir()
        try:
            if self.version == 2:
                self._write("memory.max", str(self.limit))
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", "0")
            else:
                self._write("memory.limit_in_bytes", str(self.limit))
        except OSError:
            self.path.rmdir()
            raise
        return self

    def prefix(self) -> list[str]:
        """``sh -c 'echo $$ > cgroup.procs && exec "$@"'``: join, then become the command."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"]

    def usage(self) -> dict[str, int | None]:
        """``cgroup_peak``: the group's peak charge (process + page cache), None if the kernel
        does not keep one; ``cgroup_limit_hits``: how often the limit was reached (v1 failcnt,
        v2 ``memory.events`` max); ``oom_kills``."""
        if self.version == 2:
            events = self._counters("memory.events")
            peak_file = self.path / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else None
            return {
                "cgroup_peak": peak,
                "cgroup_limit_hits": events.get("max", 0),
                "oom_kills": events.get("oom_kill", 0),
            }
        return {
            "cgroup_peak": int((self.path / "memory.max_usage_in_bytes").read_text()),
            "cgroup_limit_hits": int((self.path / "memory.failcnt").read_text()),
            "oom_kills": self._counters("memory.oom_control").get("oom_kill", 0),
        }

    def _counters(self, leaf: str) -> dict[str, int]:
        out = {}
        for line in (self.path / leaf).read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the last process may still be leaving the group
            try:
                if self.version == 1 and (self.path / "memory.force_empty").exists():
                    with contextlib.suppress(OSError):  # hand the page cache to the parent
                        self._write("memory.force_empty", "0")
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove the cgroup {self.path}", flush=True)
