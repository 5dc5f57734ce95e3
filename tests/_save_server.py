"""A fork server for the kill -9 tests in test_crash.py, run as a fresh subprocess.

Why not ``os.fork()`` from pytest: the test process has threads by then (torch's OpenMP pool,
tqdm's monitor, whatever earlier tests left) and pytest's capture descriptors; a child forked
from it may inherit a lock held by a thread that does not exist in the child. This server is
single-threaded, so every child it forks starts clean.

Protocol, one JSON object per line on stdin, one reply per line on stdout:
  {"op": "save", "seed": S, "folder": F, "layout": {...}} -> {"pid": P}
      forks a child that saves the state of seed S into F and exits (or is killed)
  {"op": "reap", "pid": P}                                -> {"status": wait status}
EOF on stdin ends the server.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)  # no OpenMP pool: the server stays single-threaded across forks

import bigmodel  # noqa: E402


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(256, 512, generator=g) for i in range(8)}


def reply(obj: dict[str, int]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    states: dict[int, dict[str, torch.Tensor]] = {}
    reply({"ready": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "save":
            tensors = states.setdefault(cmd["seed"], state(cmd["seed"]))
            pid = os.fork()
            if pid == 0:  # the child saves and is killed; it never returns into the loop
                code = 0
                try:
                    bigmodel.save_checkpoint(
                        tensors, cmd["folder"], progress=False, **cmd["layout"]
                    )
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            reply({"pid": pid})
        elif cmd["op"] == "reap":
            _, status = os.waitpid(cmd["pid"], 0)
            reply({"status": status})
        else:
            raise SystemExit(f"unknown op {cmd['op']!r}")


if __name__ == "__main__":
    main()
