"""One rank of a two-rank gloo group whose rank 1 dies (SIGKILL) during a background save.

Usage: python _dist_kill.py RANK PORT FOLDER KILL_AT

Both ranks FSDP2-shard a Net seeded with 1 and background-save it into FOLDER, which holds an
older checkpoint. Rank 1 kills itself with SIGKILL inside its save worker, at ``KILL_AT``:
``write`` (its first shard write: the group is still gathering) or ``publish`` (every shard is
staged on both ranks, before the files are handed to rank 0). Rank 0 waits on its handle and
prints one JSON line (``RESULT {...}``) saying what it raised and what the folder holds, then
leaves through the ordinary interpreter exit (no ``os._exit``): the test checks that it ends.
"""

import datetime
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import bigmodel
from _dist_worker import Net


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_at: str) -> None:
    """Rank 1: make its save worker kill the process at ``kill_at``."""
    if kill_at == "write":
        from bigmodel.execution import writing

        writing.ShardStager.stage = _die  # type: ignore[method-assign]
    else:
        from bigmodel.execution import distributed_save

        distributed_save.DistributedSave._publish = _die  # type: ignore[method-assign]


def _model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = Net()
    mesh = init_device_mesh("cpu", (2,))
    for layer in (model.up, model.down):
        fully_shard(layer, mesh=mesh)
    return model


def _outcome(handle: bigmodel.SaveHandle, folder: Path) -> dict:
    try:
        handle.wait(timeout=60)
    except BaseException as exc:
        raised = {
            "raised": type(exc).__name__,
            "message": str(exc),
            "ranks": sorted(getattr(exc, "failures", {})),
        }
    else:
        raised = {"raised": None}
    return {**raised, "files": sorted(os.listdir(folder))}


def main() -> None:
    rank, port, folder, kill_at = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    model = _model()
    if rank == 1:
        _arm(kill_at)
    handle = bigmodel.save_checkpoint(model, folder, background=True, max_shard_size="12KB")
    if rank == 0:
        print("RESULT " + json.dumps(_outcome(handle, folder)), flush=True)
    else:
        handle.wait(timeout=60)  # not reached: the worker kills this process


if __name__ == "__main__":
    main()
