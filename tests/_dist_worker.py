"""One rank of a gloo group, run by test_distributed.py as a long-lived subprocess.

Usage: python _dist_worker.py RANK WORLD PORT

The rank joins the group once, then runs the scenarios it is sent, one after another in the
same group: it reads one JSON request a line on stdin, ``{"scenario": NAME, "folder": PATH,
"options": {...}}``, and answers each with one JSON line on stdout, ``{"rank": R, "result":
{...}}`` (what the test checks) or ``{"rank": R, "error": TRACEBACK}``. A request without a
scenario, or the end of stdin, leaves the group and exits. Scenarios undo what they patch, so
the next one finds the process as it was.
"""

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import bigmodel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.up = nn.Linear(32, 96)
        self.down = nn.Linear(96, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(10, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.down(torch.relu(self.up(x))))


def reference(folder: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with bigmodel.open_checkpoint(folder) as ckpt:
        out = {}
        for key in ckpt.keys():
            t = ckpt.get_tensor(key).clone()
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def stored_total() -> int:
    """Bytes of the checkpoint's tensors (tied weights are stored once)."""
    with bigmodel.init_empty_weights(include_buffers=True):
        unique = {id(t): t for t in Net().state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def mapping_of(tensor: torch.Tensor) -> str:
    """The file behind the memory holding ``tensor``'s data ('' for anonymous memory)."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def replicated(folder: str, opts: dict) -> dict:
    dtype = getattr(torch, opts["dtype"]) if opts.get("dtype") else None
    with bigmodel.init_empty_weights():
        model = Net()
    report = bigmodel.load_checkpoint(
        model,
        folder,
        dtype=dtype,
        distributed=bigmodel.DistributedOptions(strategy=opts["strategy"]),
    )
    expected = reference(folder, dtype)
    state = model.state_dict()
    return {
        "equal": all(torch.equal(state[k], v) for k, v in expected.items()),
        "dtypes": sorted({str(t.dtype) for t in state.values()}),
        "tied": model.head.weight is model.embed.weight,
        "bytes_read": report.bytes_read,
        "total": stored_total(),
        "up_weight_file": mapping_of(model.up.weight),
    }


def sharded(folder: str, opts: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = Net()
    if opts["how"] == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model.up, model.down):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    model.steps = torch.arange(10, dtype=torch.int64)  # a real buffer, as init_empty_weights keeps
    report = bigmodel.load_checkpoint(model, folder, strict=True)
    expected = reference(folder, None)
    full = {}
    for name, tensor in model.state_dict().items():
        full[name] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    ids = torch.tensor([[1, 5, 7, 2]])
    with bigmodel.init_empty_weights():
        plain = Net()
    bigmodel.load_checkpoint(plain, folder)
    with torch.no_grad():
        out = model(ids)
        out = out.full_tensor() if isinstance(out, DTensor) else out
        same_output = torch.allclose(out, plain(ids), atol=1e-5)
    sharded_names = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    dtensor_bytes = sum(expected[n].numel() * expected[n].element_size() for n in sharded_names)
    return {
        "equal": all(torch.equal(full[k], v) for k, v in expected.items() if k in full),
        "same_output": same_output,
        "bytes_read": report.bytes_read,
        "sharded_bytes": dtensor_bytes,
        "sharded": sorted(sharded_names),
        "total": stored_total(),
    }


def save_llama(folder: str, opts: dict) -> dict:
    """FSDP2-shard a Llama built on meta, load it sharded, save it from both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = AutoConfig.from_pretrained(folder)
    with bigmodel.init_empty_weights():  # rotary inv_freq stays real: it is computed, not stored
        model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, buf in model.named_buffers():  # rotary inv_freq: computed, not stored
        if buf.is_meta:
            raise SystemExit(f"buffer {name} left on meta by this construction")
    bigmodel.load_checkpoint(model, folder, strict=False)
    result = bigmodel.save_checkpoint(model, opts["out"], max_shard_size=opts["shard"])
    return {"files": result.files, "index": result.index_file}


def placements_full() -> dict[str, torch.Tensor]:
    """Seeded full tensors, the same on every rank and in the test that checks the save."""
    g = torch.Generator().manual_seed(0)
    return {
        "uneven_rows": torch.randn(7, 5, generator=g),  # 4 + 3 rows on two ranks
        "columns": torch.randn(4, 6, generator=g),
        "replicated": torch.randn(3, 3, generator=g),
        "ints": torch.arange(11, dtype=torch.int64),
        "one_row": torch.randn(1, 8, generator=g),  # rank 1's shard is empty
        "partial": torch.randn(2, 2, generator=g),
    }


def save_placements(folder: str, opts: dict) -> dict:
    """Save DTensors of every placement from all ranks; count the all-gathers it falls back to.

    ``opts["mesh"] == "2x2"`` (four ranks): an HSDP-style mesh, replicated across its first
    dimension and sharded across the second, where replicas send duplicate pieces.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    full = placements_full()
    if opts.get("mesh") == "2x2":
        mesh = init_device_mesh("cpu", (2, 2))
        state = {
            key: distribute_tensor(full[key], mesh, [Replicate(), Shard(0)])
            for key in ("uneven_rows", "ints", "one_row")
        }
        state["columns"] = distribute_tensor(full["columns"], mesh, [Shard(1), Replicate()])
    else:
        mesh = init_device_mesh("cpu", (world,))
        state = {
            "uneven_rows": distribute_tensor(full["uneven_rows"], mesh, [Shard(0)]),
            "columns": distribute_tensor(full["columns"], mesh, [Shard(1)]),
            "replicated": distribute_tensor(full["replicated"], mesh, [Replicate()]),
            "ints": distribute_tensor(full["ints"], mesh, [Shard(0)]),
            "one_row": distribute_tensor(full["one_row"], mesh, [Shard(0)]),
            # a pending sum: only full_tensor() can reduce it
            "partial": DTensor.from_local(full["partial"] / world, mesh, [Partial()]),
        }
    calls = []
    original = DTensor.full_tensor

    def counting(self, *args, **kwargs):
        calls.append(list(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = counting
    try:
        result = bigmodel.save_checkpoint(state, opts["out"], max_shard_size=opts["shard"])
    finally:
        DTensor.full_tensor = original
    return {"full_tensor_calls": calls, "files": result.files}


def save_failing(folder: str, opts: dict) -> dict:
    """Both ranks save a replicated model into opts['out']; rank opts['bad_rank'] fails writing."""
    import bigmodel.execution.writing as writing_module

    with bigmodel.init_empty_weights():
        model = Net()
    bigmodel.load_checkpoint(model, folder)
    original = writing_module._write_shard
    if dist.get_rank() == opts["bad_rank"]:

        def broken(fh, **kwargs):
            fh.write(b"partial")
            raise OSError(28, "No space left on device")

        writing_module._write_shard = broken  # what every shard write goes through
    try:
        bigmodel.save_checkpoint(
            model, opts["out"], max_shard_size="12KB", process_group=dist.group.WORLD
        )
    except bigmodel.DistributedError as exc:
        return {"raised": "DistributedError", "ranks": list(exc.failures), "message": str(exc)}
    finally:
        writing_module._write_shard = original
    return {"raised": None}


def sharded_missing(folder: str, opts: dict) -> dict:
    """A sharded parameter missing from the checkpoint is an error, not a silent plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    partial = opts["partial"]
    if dist.get_rank() == 0:
        with bigmodel.open_checkpoint(folder) as ckpt:
            state = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys() if k != "up.weight"}
        bigmodel.save_checkpoint(state, partial)  # rank 0 alone: a plain save must not wait
    dist.barrier()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with bigmodel.init_empty_weights():
        model = Net()
    fully_shard(model.up, mesh=mesh)
    try:
        bigmodel.load_checkpoint(model, partial, strict=False)
    except bigmodel.MetaTensorError as exc:
        return {"raised": "MetaTensorError", "message": str(exc)}
    return {"raised": None}


def failing(folder: str, opts: dict) -> dict:
    target = folder if dist.get_rank() != opts["bad_rank"] else folder + "-missing"
    with bigmodel.init_empty_weights():
        model = Net()
    try:
        bigmodel.load_checkpoint(
            model,
            target,
            distributed=bigmodel.DistributedOptions(strategy=opts.get("strategy", "auto")),
        )
    except bigmodel.DistributedError as exc:
        return {"raised": "DistributedError", "ranks": list(exc.failures), "message": str(exc)}
    return {"raised": None}


def sharded_moe(folder: str, opts: dict) -> dict:
    """FSDP2-shard a Mixtral built on meta; load an original-layout checkpoint (one tensor per
    expert), whose fused experts each rank builds from only the experts its slice holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**opts["config"])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with bigmodel.init_empty_weights():
        model = MixtralForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = bigmodel.load_checkpoint(model, folder, dtype=getattr(torch, opts["dtype"]))
    reference = MixtralForCausalLM.from_pretrained(folder, dtype=getattr(torch, opts["dtype"]))
    theirs = reference.state_dict()
    equal = {
        name: bool(torch.equal(tensor.full_tensor(), theirs[name]))
        for name, tensor in model.state_dict().items()
    }
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    local = model.state_dict()[fused].to_local()
    return {
        "equal": all(equal.values()),
        "unequal": [n for n, ok in equal.items() if not ok][:5],
        "converted": sorted(report.converted_keys),
        "local_rows": local.shape[0],
        "bytes_read": report.bytes_read,
    }


def ping(folder: str, opts: dict) -> dict:
    """One all-reduce: the group still works (after a scenario that failed on purpose)."""
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    return {"sum": int(total)}


def _fsdp_llama(folder: str):
    """A tiny Llama built on meta, FSDP2-sharded over every rank, loaded from ``folder``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = AutoConfig.from_pretrained(folder)
    with bigmodel.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    bigmodel.load_checkpoint(model, folder, strict=False)
    return model


def _train(model, optimizer, steps: int) -> list[float]:
    """``steps`` AdamW steps on fixed tokens (FSDP2's collectives run on the default group)."""
    ids = torch.arange(12).reshape(2, 6) % 100
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class _Gate:
    """Holds this rank's first background shard write until :meth:`open` (the loop runs first)."""

    def __init__(self) -> None:
        import threading

        from bigmodel.execution import writing

        self.entered = threading.Event()
        self.release = threading.Event()
        self.cls = writing.ShardStager
        self.real = self.cls.stage
        gate = self

        def gated(stager, name, tensors):
            gate.entered.set()
            if not gate.release.wait(60):
                raise TimeoutError("the test never released the writer")
            return gate.real(stager, name, tensors)

        self.cls.stage = gated

    def open(self) -> None:
        self.release.set()
        self.cls.stage = self.real


def bg_save_llama(folder: str, opts: dict) -> dict:
    """Background-save an FSDP2 Llama, train and all_reduce on the default group while the
    worker is held mid-save, then release it: the checkpoint must hold the values at the call."""
    model = _fsdp_llama(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    gate = _Gate()
    try:
        handle = bigmodel.save_checkpoint(
            model, opts["out"], background=True, max_shard_size=opts["shard"]
        )
        staged, done_early = handle.staged(), handle.done()
        _train(model, optimizer, 2)  # FSDP2 all-gathers and reduce-scatters on the default group
        total = torch.tensor([dist.get_rank() + 1.0])
        for _ in range(5):
            dist.all_reduce(total)
        entered = gate.entered.wait(60)
    finally:
        gate.open()
    result = handle.wait(timeout=60)
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return {
        "staged": staged,
        "done_early": done_early,
        "writer_was_held": entered,
        "all_reduce": float(total),
        "changed": any(not torch.equal(before[k], after[k]) for k in before),
        "files": result.files,
        "index": result.index_file,
    }


def bg_save_failing(folder: str, opts: dict) -> dict:
    """Both ranks background-save an FSDP2 Net; rank opts['bad_rank'] fails (opts['fail']:
    'write' a full disk, 'stage' staging memory that cannot be had)."""
    import bigmodel.execution.background as background_module
    import bigmodel.execution.writing as writing_module

    model = _fsdp_net(folder)
    real_write = writing_module._write_shard
    if dist.get_rank() == opts["bad_rank"]:
        if opts["fail"] == "write":

            def broken(fh, **kwargs):
                fh.write(b"partial")
                raise OSError(28, "No space left on device")

            writing_module._write_shard = broken
        else:

            def no_memory(*args, **kwargs):
                raise MemoryError("cannot allocate the staging buffer")

            background_module._STAGING.stage = no_memory
    try:
        handle = bigmodel.save_checkpoint(
            model, opts["out"], background=True, max_shard_size="12KB"
        )
        try:
            handle.wait(timeout=60)
        except bigmodel.DistributedError as exc:
            cause = exc.__cause__
            return {
                "raised": "DistributedError",
                "ranks": list(exc.failures),
                "message": str(exc),
                "cause": type(cause).__name__ if cause is not None else None,
            }
    finally:
        writing_module._write_shard = real_write
        vars(background_module._STAGING).pop("stage", None)
    return {"raised": None}


def _fsdp_net(folder: str):
    """Net with up and down FSDP2-sharded over every rank, loaded from ``folder``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with bigmodel.init_empty_weights():
        model = Net()
    for layer in (model.up, model.down):
        fully_shard(layer, mesh=mesh)
    bigmodel.load_checkpoint(model, folder)
    return model


class _MainThreadCollectives:
    """Counts torch.distributed collectives called from the main thread (the training loop's)."""

    NAMES = ("all_gather_object", "broadcast_object_list", "gather", "all_gather", "broadcast")

    def __init__(self) -> None:
        import threading

        self.calls: list[str] = []
        self.real = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.real.items():

            def counting(*args, _name=name, _fn=fn, **kwargs):
                if threading.current_thread() is threading.main_thread():
                    self.calls.append(_name)
                return _fn(*args, **kwargs)

            setattr(dist, name, counting)

    def close(self) -> None:
        for name, fn in self.real.items():
            setattr(dist, name, fn)


def _local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def bg_save_replan(folder: str, opts: dict) -> dict:
    """Three background saves of an unchanged FSDP2 Net, weights changed between them: from
    the second on, no collective runs in the calling thread and the pieces are not recomputed;
    each checkpoint holds the values of its call."""
    from bigmodel.execution import distributed_save

    model = _fsdp_net(folder)
    real_pieces = distributed_save.pieces_of
    pieces_calls = []
    distributed_save.pieces_of = lambda *a, **k: pieces_calls.append(1) or real_pieces(*a, **k)
    counter = _MainThreadCollectives()
    equal, calls = [], []
    try:
        for i in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    _local_of(p).mul_(1.5)  # an optimizer step, in place
            expected = {k: _whole(v).clone() for k, v in model.state_dict().items()}
            counter.calls.clear()
            del pieces_calls[:]
            out = f"{opts['out']}-{i}"
            handle = bigmodel.save_checkpoint(model, out, background=True, max_shard_size="12KB")
            calls.append((list(counter.calls), len(pieces_calls)))
            with torch.no_grad():
                for p in model.parameters():
                    _local_of(p).add_(1.0)  # changed right after the call
            handle.wait(timeout=60)
            with bigmodel.open_checkpoint(out) as ckpt:
                got = {k: ckpt.get_tensor(k) for k in ckpt.keys()}
            equal.append(all(torch.equal(got[k], expected[k]) for k in got) and len(got) > 3)
    finally:
        counter.close()
        distributed_save.pieces_of = real_pieces
    return {"calls": calls, "equal": equal}


def bg_save_mismatch(folder: str, opts: dict) -> dict:
    """Both ranks save the same FSDP2 Net (in the background if opts['background']), rank 1
    with another shard size: the ranks plan different files, which every rank must report
    (not a hang, not a wrong checkpoint)."""
    model = _fsdp_net(folder)
    shard = "6KB" if dist.get_rank() == 1 else "12KB"
    try:
        handle = bigmodel.save_checkpoint(
            model, opts["out"], background=opts["background"], max_shard_size=shard
        )
        handle.wait(timeout=60)
    except bigmodel.DistributedError as exc:
        return {"raised": "DistributedError", "ranks": list(exc.failures), "message": str(exc)}
    return {"raised": None}


def manager(folder: str, opts: dict) -> dict:
    """CheckpointManager with an FSDP2 Llama: background saves while training, rotation, then
    restore into a fresh model and optimizer and train on: the losses must match."""
    model = _fsdp_llama(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = bigmodel.CheckpointManager(opts["root"], keep_last=2, max_shard_size="40KB")
    handle = None
    for step in (1, 2, 3):
        _train(model, optimizer, 1)
        handle = manager.save(step, model, optimizer, extra={"step": step})
    uninterrupted = _train(model, optimizer, 2)  # while step 3 is written
    handle.wait(timeout=60)
    steps, latest = manager.steps(), manager.latest()
    fresh = _fsdp_llama(folder)  # the weights of the start, not of step 3
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restored = manager.restore(fresh, fresh_optimizer)
    local = next(iter(fresh_optimizer.state.values()))["exp_avg"]
    return {
        "steps": steps,
        "latest": latest,
        "restored": list(restored),
        "uninterrupted": uninterrupted,
        "resumed": _train(fresh, fresh_optimizer, 2),
        "exp_avg_is_sharded": type(local).__name__ == "DTensor",
    }


SCENARIOS = {
    "manager": manager,
    "bg-save-llama": bg_save_llama,
    "bg-save-failing": bg_save_failing,
    "bg-save-replan": bg_save_replan,
    "bg-save-mismatch": bg_save_mismatch,
    "replicated": replicated,
    "sharded": sharded,
    "failing": failing,
    "sharded-missing": sharded_missing,
    "save-llama": save_llama,
    "save-failing": save_failing,
    "save-placements": save_placements,
    "ping": ping,
    "sharded-moe": sharded_moe,
}


def main() -> None:
    rank, world, port = (int(arg) for arg in sys.argv[1:4])
    # Answers go to a private copy of stdout; whatever else writes to stdout (a library's print,
    # C code) lands in stderr and cannot corrupt them.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if not request.get("scenario"):
                break
            try:
                scenario = SCENARIOS[request["scenario"]]
                answer = {"rank": rank, "result": scenario(request["folder"], request["options"])}
            except BaseException:  # SystemExit too: report it, the test decides
                answer = {"rank": rank, "error": traceback.format_exc()}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
            dist.barrier()  # no rank starts the next scenario while a peer is in this one
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads can abort it ("terminate called
    # without an active exception", pytorch/pytorch#190489) after the work is done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
