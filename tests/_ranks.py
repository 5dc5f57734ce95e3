"""Two-rank gloo groups for the distributed tests: ``RankGroup`` (long-lived ranks of
_dist_worker.py running scenarios in turn), ``run_ranks`` (fresh ranks for one scenario), the
module-scoped ``ranks`` fixture and the ``net_folder`` fixture (the worker's Net, saved).

A test module uses the fixtures by importing them,
``from _ranks import net_folder_fixture, ranks_fixture  # noqa: F401``: pytest finds them under
their fixture names (``name=``), which no import then shadows, and each importing module gets
its own pair of ranks and its own folder (module scope).
"""

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import bigmodel
from _dist_worker import Net

WORKER = Path(__file__).with_name("_dist_worker.py")


def free_port() -> int:
    """A TCP port free on the loopback now, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """``world`` long-lived ranks of _dist_worker.py in one gloo group, running scenarios in turn.

    Every wait has a deadline: a rank that does not answer in time, dies, or raises fails the
    test with its message and the end of its stderr, and the group is torn down; the next
    scenario starts a fresh one, so a broken group never hangs or poisons the tests after it.
    """

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.buffers: list[bytes] = []

    def _start(self) -> None:
        port = free_port()
        # each rank's stderr, to a file: a pipe nobody reads could fill and stall the rank
        self.logs = [tempfile.TemporaryFile() for _ in range(self.world)]  # noqa: SIM115
        self.buffers = [b""] * self.world
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(rank), str(self.world), str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.logs[rank],
                # loopback for gloo: a sandbox's hostname may not resolve to a usable interface
                env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
            )
            for rank in range(self.world)
        ]

    def _report(self, rank: int) -> str:
        code = self.procs[rank].poll()
        log = self.logs[rank]
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:] or "(empty)\n"
        state = "still running" if code is None else f"exit code {code}"
        return f"\n-- rank {rank} ({state}), end of its stderr:\n{tail}"

    def _fail(self, message: str) -> None:
        details = "".join(self._report(rank) for rank in range(len(self.procs)))
        self.close(timeout=0)  # peers of a failed rank may be stuck in a collective
        pytest.fail(message + details, pytrace=False)

    def _answer(self, rank: int, scenario: str, deadline: float, timeout: float) -> dict:
        """Rank ``rank``'s next answer line, read before ``deadline``."""
        fd = self.procs[rank].stdout.fileno()
        while b"\n" not in self.buffers[rank]:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"rank {rank} gave no answer to {scenario!r} within {timeout} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self._fail(f"rank {rank} exited during {scenario!r}")
                self.buffers[rank] += chunk
        line, self.buffers[rank] = self.buffers[rank].split(b"\n", 1)
        return json.loads(line)

    def run(self, scenario: str, folder, options=None, timeout: float = 90) -> list[dict]:
        """Run ``scenario`` on every rank; return each rank's result, in rank order."""
        if not self.procs:
            self._start()
        request = {"scenario": scenario, "folder": str(folder), "options": options or {}}
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
        except BrokenPipeError:
            self._fail(f"a rank had exited before {scenario!r} was sent")
        answers = [self._answer(rank, scenario, deadline, timeout) for rank in range(self.world)]
        errors = [a for a in answers if "error" in a]
        if errors:  # a rank raised where the scenario expects none: its peers may be stuck
            self._fail(
                "".join(f"rank {a['rank']} raised in {scenario!r}:\n{a['error']}" for a in errors)
            )
        return [{"rank": a["rank"], **a["result"]} for a in answers]

    def close(self, timeout: float = 30) -> None:
        """Ask every rank to leave the group and exit; kill those still there at the deadline."""
        for proc in self.procs:
            with contextlib.suppress(OSError):  # a rank already gone
                proc.stdin.write(b"{}\n")
                proc.stdin.flush()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []


def run_ranks(scenario, folder, options=None, world=2, timeout=90):
    """Start ``world`` fresh ranks for one scenario; return each rank's result, in rank order."""
    group = RankGroup(world)
    try:
        return group.run(scenario, folder, options, timeout=timeout)
    finally:
        group.close()


@pytest.fixture(scope="module", name="ranks")
def ranks_fixture():
    """Two ranks shared by every two-rank scenario of the module, torn down at its end."""
    group = RankGroup(world=2)
    yield group
    group.close()


@pytest.fixture(scope="module", name="net_folder")
def net_folder_fixture(tmp_path_factory):
    """The worker's Net (seed 0) saved in 12 KB shards, once a module."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dist") / "ckpt"
    bigmodel.save_checkpoint(Net(), path, max_shard_size="12KB")
    return path
