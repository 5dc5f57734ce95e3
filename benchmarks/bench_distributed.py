"""Distributed load and save benchmark: two gloo ranks on this machine, bigmodel vs the alternatives.

    python benchmarks/bench_distributed.py                 # ~3 GB fp32 Llama-style checkpoint
    python benchmarks/bench_distributed.py --size small    # ~300 MB, for a quick look
    python benchmarks/bench_distributed.py --scenarios save   # only the distributed save

Three scenarios, each run as a real group of two processes (``init_process_group("gloo")``),
bigmodel and the alternatives side by side in the same run:

* replicated fp32 -> bf16 (data parallel / multi-worker inference): every rank needs the
  whole model. bigmodel's default on CPU converts once per node into shared memory and every
  rank maps it; transformers ``from_pretrained(dtype=bf16)`` converts on every rank.
* sharded fp32 (FSDP2 ``fully_shard`` on every decoder layer and the root): bigmodel loads
  into the meta-initialised, already-sharded model, each rank reading its slices;
  transformers loads the whole model on every rank, then ``fully_shard`` shards it.
* save of that FSDP2 model as a Hugging Face checkpoint in 500 MB shards (``durable=False``
  on every side, since the alternative never fsyncs): bigmodel, where each rank gathers the
  tensors of its own shard files and writes them; the same with every DTensor all-gathered
  (``full_tensor()``, what bigmodel did before gathering to the writer); and the PyTorch +
  huggingface_hub way: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``
  then ``huggingface_hub.save_torch_state_dict`` on rank 0. Not timed: building and loading
  the sharded model before the save.

"Ready" means every local parameter has been summed once. Memory is sampled from
/proc/self/status: peak RssAnon (private), RssShmem (shared memory such as /dev/shm) and
RssFile (mapped page cache), as increases over the process before the load. Bytes read are
bigmodel's own count of checkpoint bytes each rank materialised (transformers does not
report it). The page cache is warm. The table (medians over ``--repeats`` runs of the slowest
rank's time) is printed and written to docs/benchmarks/distributed.md.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import (
    _config,
    child_env,
    common_parser,
    ensure_checkpoint,
    publish_table,
    warm_page_cache,
)

METHODS = {
    "replicated": ("bigmodel", "transformers"),
    "sharded": ("bigmodel", "transformers"),
    "save": ("bigmodel", "bigmodel-allgather", "torch+hf_hub"),
}
GB = 1e9


# -- one rank -----------------------------------------------------------------------------------
def rank_main(
    scenario: str, method: str, rank: int, world: int, port: int, folder: Path, size: str
) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import bigmodel
    from bigmodel.foundations.memory import MemorySampler

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    config = _config(size)
    mesh = None
    if scenario in ("sharded", "save"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
    with bigmodel.init_empty_weights():  # warm up lazy imports outside the timing
        LlamaForCausalLM(_config("tiny"))
    dist.barrier()
    if scenario == "save":
        _save_rank(method, rank, folder, config, mesh)
        return
    bytes_read = None
    with MemorySampler() as sampler:
        start = time.perf_counter()
        if scenario == "replicated":
            if method == "bigmodel":
                with bigmodel.init_empty_weights():
                    model = LlamaForCausalLM(config)
                report = bigmodel.load_checkpoint(
                    model, folder, dtype=torch.bfloat16, progress=False
                )
                bytes_read = report.bytes_read
            else:
                model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        else:
            if method == "bigmodel":
                with bigmodel.init_empty_weights():
                    model = LlamaForCausalLM(config)
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                report = bigmodel.load_checkpoint(model, folder, progress=False)
                bytes_read = report.bytes_read
            else:
                model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
        with torch.no_grad():
            checksum = 0.0
            for p in model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                # in 1M-element pieces: the check must not cost a converted copy of a tensor
                for piece in local.detach().reshape(-1).split(1 << 20):
                    checksum += float(piece.sum(dtype=torch.float32))
        ready = time.perf_counter() - start
    dist.barrier()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "ready_s": ready,
                "anon": sampler.increase("anon"),
                "shmem": sampler.increase("shmem"),
                "file": sampler.increase("file"),
                "bytes_read": bytes_read,
                "model_bytes": model_bytes,
                "checksum": checksum,
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip finalisation: gloo threads can abort it (pytorch/pytorch#190489)


def _save_rank(method: str, rank: int, folder: Path, config: object, mesh: object) -> None:
    """One rank of the save scenario: load FSDP2-sharded (untimed), then time the save."""
    import shutil

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import bigmodel
    from bigmodel.foundations.memory import MemorySampler

    with bigmodel.init_empty_weights():
        model = LlamaForCausalLM(config)  # type: ignore[arg-type]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    bigmodel.load_checkpoint(model, folder, progress=False)
    with torch.no_grad():  # fault the file-backed shards in: the save, not the load, is timed
        for p in model.parameters():
            p.to_local().sum()
    if method == "bigmodel-allgather":
        import bigmodel.execution.distributed_save as distributed_save

        distributed_save._Gatherer._piece = staticmethod(lambda tensor, members: None)  # type: ignore[method-assign]
    out = folder.parent / f"{folder.name}-dist-save-{method}"
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    with MemorySampler() as sampler:
        start = time.perf_counter()
        if method.startswith("bigmodel"):
            bigmodel.save_checkpoint(
                model, out, max_shard_size="500MB", durable=False, progress=False
            )
        else:
            from huggingface_hub import save_torch_state_dict
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if rank == 0:
                out.mkdir(parents=True)  # save_torch_state_dict does not create the folder
                save_torch_state_dict(state, out, max_shard_size="500MB")
            del state
        dist.barrier()  # done when every rank is done
        seconds = time.perf_counter() - start
    checksum = 0.0
    if rank == 0:
        with bigmodel.open_checkpoint(out) as ckpt:  # the same bytes whichever way it was saved
            for key in ckpt.keys():
                checksum += float(ckpt.get_tensor(key).sum(dtype=torch.float64))
    dist.barrier()
    print(
        json.dumps(
            {
                "ready_s": seconds,
                "anon": sampler.increase("anon"),
                "shmem": sampler.increase("shmem"),
                "file": sampler.increase("file"),
                "bytes_read": None,
                "model_bytes": 0,
                "checksum": checksum,
            }
        ),
        flush=True,
    )
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


# -- the parent ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(scenario: str, method: str, folder: Path, size: str, world: int = 2) -> list[dict]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--world",
                str(world),
                "--port",
                str(port),
                "--scenario",
                scenario,
                "--method",
                method,
                "--folder",
                str(folder),
                "--size",
                size,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**child_env(), "GLOO_SOCKET_IFNAME": "lo"},
        )
        for rank in range(world)
    ]
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            for other in procs:
                other.kill()
            raise SystemExit(f"{scenario}/{method} rank {rank} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _checkpoint_bytes(folder: Path) -> int:
    import bigmodel

    with bigmodel.open_checkpoint(folder) as ckpt:
        return sum(ckpt.tensor_info(k).nbytes for k in ckpt.keys())


def _load_section(med: dict, chosen: set[str], fp32: float) -> list[str]:  # type: ignore[type-arg]
    lines = [
        "",
        "| scenario | method | ready s | Σ RssAnon GB | max RssAnon/rank GB | max RssShmem GB | max RssFile GB | max bytes read/rank GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (scenario, method), m in med.items():
        if scenario == "save":
            continue
        read = "—" if m["read_max"] != m["read_max"] else f"{m['read_max'] / GB:.2f}"
        lines.append(
            f"| {scenario} | {method} | {m['ready']:.2f} | {m['anon_sum'] / GB:.2f} | {m['anon_max'] / GB:.2f} "
            f"| {m['shmem_max'] / GB:.2f} | {m['file_max'] / GB:.2f} | {read} |"
        )
    lines += ["", "| target | measured |", "|---|---|"]
    times = []
    if "replicated" in chosen:
        rep_b, rep_t = med[("replicated", "bigmodel")], med[("replicated", "transformers")]
        lines.append(
            f"| replicated fp32→bf16: Σ RssAnon over ranks ≤ 1.15x one bf16 copy | bigmodel {rep_b['anon_sum'] / (fp32 / 2):.2f}x "
            f"(+ one shared copy of {rep_b['shmem_max'] / GB:.2f} GB in /dev/shm per node), transformers {rep_t['anon_sum'] / (fp32 / 2):.2f}x |"
        )
        times.append(("replicated", rep_b["ready"] / rep_t["ready"]))
    if "sharded" in chosen:
        sh_b, sh_t = med[("sharded", "bigmodel")], med[("sharded", "transformers")]
        lines += [
            f"| sharded: bytes read per rank ≤ 0.6x checkpoint | bigmodel {sh_b['read_max'] / fp32:.2f}x |",
            f"| sharded: peak RssAnon per rank ≤ 0.6x model | bigmodel {sh_b['anon_max'] / fp32:.2f}x, transformers {sh_t['anon_max'] / fp32:.2f}x |",
        ]
        times.append(("sharded", sh_b["ready"] / sh_t["ready"]))
    lines.append(
        f"| time vs transformers ({', '.join(n for n, _ in times)}) | {', '.join(f'{r:.2f}x' for _, r in times)} |"
    )
    return lines


def _save_section(med: dict, fp32: float) -> list[str]:  # type: ignore[type-arg]
    save = {m: med[("save", m)] for m in METHODS["save"]}
    lines = [
        "",
        f"## Saving the FSDP2-sharded model as a Hugging Face checkpoint ({fp32 / GB:.2f} GB, 500 MB shards, no fsync)",
        "",
        "| method | seconds | vs torch+hf_hub | Σ RssAnon GB | max RssAnon/rank GB |",
        "|---|---|---|---|---|",
    ]
    for method, m in save.items():
        lines.append(
            f"| {method} | {m['ready']:.2f} | {m['ready'] / save['torch+hf_hub']['ready']:.2f}x "
            f"| {m['anon_sum'] / GB:.2f} | {m['anon_max'] / GB:.2f} |"
        )
    return lines


def main() -> None:
    parser = common_parser(__doc__, "distributed.md")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int)
    parser.add_argument("--scenario", choices=sorted(METHODS))
    parser.add_argument("--method")
    parser.add_argument("--folder", type=Path)
    parser.add_argument(
        "--scenarios",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (default: all); the table lists those run",
    )
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(
            args.scenario, args.method, args.rank, args.world, args.port, args.folder, args.size
        )
        return

    chosen = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    unknown = chosen - set(METHODS)
    if unknown or not chosen:
        parser.error(f"--scenarios: choose from {', '.join(METHODS)} (got {args.scenarios!r})")
    folder = ensure_checkpoint(args.cache, args.size)
    warm_page_cache(folder)
    fp32 = _checkpoint_bytes(folder)
    results: dict[tuple[str, str], dict[str, float]] = {}
    sums: dict[str, set[float]] = {}
    for _ in range(args.repeats):
        for scenario, methods in METHODS.items():
            if scenario not in chosen:
                continue
            for method in methods:
                ranks = run_group(scenario, method, folder, args.size)
                print(f"  {scenario:10} {method:12} {ranks}", file=sys.stderr)
                key = (scenario, method)
                row = results.setdefault(
                    key,
                    {
                        "ready": [],
                        "anon_sum": [],
                        "anon_max": [],
                        "shmem_max": [],
                        "file_max": [],
                        "read_max": [],
                    },
                )
                row["ready"].append(max(r["ready_s"] for r in ranks))
                row["anon_sum"].append(sum(r["anon"] for r in ranks))
                row["anon_max"].append(max(r["anon"] for r in ranks))
                row["shmem_max"].append(max(r["shmem"] for r in ranks))
                row["file_max"].append(max(r["file"] for r in ranks))
                reads = [r["bytes_read"] for r in ranks if r["bytes_read"] is not None]
                row["read_max"].append(max(reads) if reads else float("nan"))
                sums.setdefault(scenario, set()).add(round(sum(r["checksum"] for r in ranks), 1))
    med = {k: {m: statistics.median(v) for m, v in row.items()} for k, row in results.items()}
    scenarios_run = f" --scenarios {args.scenarios}" if chosen != set(METHODS) else ""
    lines = [
        f"# Distributed load and save — {args.size} checkpoint ({fp32 / GB:.2f} GB fp32), 2 gloo ranks on one machine",
        "",
        f"Medians of {args.repeats} run(s); time is the slowest rank's, warm page cache. "
        f"Command: `python benchmarks/bench_distributed.py --size {args.size} --repeats {args.repeats}{scenarios_run}`.",
    ]
    if chosen & {"replicated", "sharded"}:
        lines += _load_section(med, chosen, fp32)
    if "save" in chosen:
        lines += _save_section(med, fp32)
    lines += [
        "",
        "Every method writes the same weights, and every loaded model holds the same weights: the "
        "sums of every tensor agree across methods within each scenario "
        f"({'yes' if all(len(v) == 1 for v in sums.values()) else 'NO: ' + str(sums)}).",
    ]
    publish_table(lines, args.out)


if __name__ == "__main__":
    main()
