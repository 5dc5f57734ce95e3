"""Two-rank gloo groups on CPU, each rank a real subprocess: replicated and sharded loads, errors."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bigmodel

WORKER = Path(__file__).with_name("_dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _dist_worker import Net  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario, folder, options=None, world=2, timeout=90):
    """Start ``world`` ranks of _dist_worker.py; return each rank's JSON result, rank order."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(rank), str(world), str(port), str(folder)]
            + ([json.dumps(options)] if options is not None else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # loopback for gloo: a sandbox's hostname may not resolve to a usable interface
            env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
        )
        for rank in range(world)
    ]
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, (
                f"rank {rank} exited with {proc.returncode}:\n{err[-3000:]}"
            )
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dist") / "ckpt"
    bigmodel.save_checkpoint(Net(), path, max_shard_size="12KB")
    return path


def test_replicated_cpu_loads_map_the_same_files_on_every_rank(folder):
    ranks = run_ranks("replicated", folder, {"strategy": "auto"})
    for r in ranks:
        assert r["equal"] and r["tied"]
        assert r["bytes_read"] == r["total"]
        assert r["up_weight_file"].startswith(str(folder)), r  # a view of the shard, no copy


def test_a_cpu_conversion_is_done_once_per_node_in_shared_memory_and_mapped_by_every_rank(folder):
    ranks = run_ranks("replicated", folder, {"strategy": "auto", "dtype": "bfloat16"})
    for r in ranks:
        assert r["equal"] and r["tied"]
        assert r["dtypes"] == ["torch.bfloat16", "torch.int64"]
        # the weight is a view of the node's converted file (unlinked once every rank mapped it)
        assert "bigmodel-" in r["up_weight_file"] and "(deleted)" in r["up_weight_file"], r
    assert ranks[1]["bytes_read"] < ranks[0]["bytes_read"]  # only the node's leader converted


@pytest.mark.parametrize("strategy", ["scatter", "rank0"])
def test_scatter_and_rank0_read_each_byte_once_and_broadcast(folder, strategy):
    ranks = run_ranks("replicated", folder, {"strategy": strategy, "dtype": "bfloat16"})
    assert all(r["equal"] and r["tied"] for r in ranks)
    total = ranks[0]["total"]
    assert sum(r["bytes_read"] for r in ranks) == total
    if strategy == "scatter":
        assert all(r["bytes_read"] < 0.7 * total for r in ranks), ranks
    else:
        assert ranks[1]["bytes_read"] == 0


@pytest.mark.parametrize("how", ["fsdp", "tp"])
def test_dtensor_parameters_get_only_their_slice_and_gather_to_the_checkpoint(folder, how):
    ranks = run_ranks("sharded", folder, {"how": how})
    for r in ranks:
        assert r["equal"] and r["same_output"], r
        assert r["sharded"], r
    # each rank read about half of every sharded tensor, never the whole
    assert sum(r["bytes_read"] for r in ranks) < 2 * ranks[0]["total"]
    for r in ranks:
        assert r["bytes_read"] <= r["total"] - 0.4 * r["sharded_bytes"], r


def test_a_sharded_parameter_missing_from_the_checkpoint_is_an_error_on_every_rank(
    folder, tmp_path
):
    ranks = run_ranks("sharded-missing", folder, {"partial": str(tmp_path / "partial")})
    for r in ranks:
        assert r["raised"] == "MetaTensorError" and "up.weight" in r["message"], r


@pytest.mark.parametrize("strategy", ["auto", "scatter"])
def test_a_failure_on_one_rank_raises_on_every_rank_and_names_it(folder, strategy):
    ranks = run_ranks("failing", folder, {"bad_rank": 1, "strategy": strategy})
    for r in ranks:
        assert r["raised"] == "DistributedError", r
        assert r["ranks"] == [1]
        assert "-missing" in r["message"] and "rank 1" in r["message"]


def test_a_single_process_has_no_group_and_takes_the_ordinary_path():
    from bigmodel.execution.distributed import assign_owners, choose_strategy, resolve_group

    assert resolve_group(None) is None
    assert assign_owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]
    assert choose_strategy("auto", on_cpu=True, converting=False) == "mmap"
    assert choose_strategy("auto", on_cpu=True, converting=True) == "shm"
    assert choose_strategy("auto", on_cpu=False, converting=False) == "scatter"
    with pytest.raises(ValueError, match="choose one of"):
        choose_strategy("fastest", on_cpu=True, converting=False)


# -- distributed save ------------------------------------------------------------------------------
def test_an_fsdp_model_saved_from_two_ranks_is_one_checkpoint_transformers_loads(tmp_path):
    import shutil

    from transformers import LlamaForCausalLM

    from conftest import assert_same_state, tiny_llama_config

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(tie=False)).eval()
    reference.save_pretrained(tmp_path / "ref")
    out = tmp_path / "out"
    ranks = run_ranks(
        "save-llama", tmp_path / "ref", {"out": str(out), "shard": "40KB"}, timeout=120
    )
    assert ranks[0]["files"] == ranks[1]["files"] and len(ranks[0]["files"]) > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ranks[0]["files"] + [ranks[0]["index"]]
    )  # no temporary files left
    shutil.copy(tmp_path / "ref" / "config.json", out)
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert_same_state(loaded.state_dict(), reference.state_dict())
    with bigmodel.open_checkpoint(out) as ckpt:
        assert ckpt.verify().problems == []  # each rank's digests reached the index


def test_each_dtensor_travels_once_to_the_rank_that_writes_it_whatever_its_placement(tmp_path):
    from _dist_worker import placements_full
    from conftest import assert_same_state

    out = tmp_path / "out"
    ranks = run_ranks("save-placements", tmp_path, {"out": str(out), "shard": "100B"})
    assert ranks[0]["files"] == ranks[1]["files"] and len(ranks[0]["files"]) > 2
    # Shard (even, uneven, empty on a rank) and Replicate are gathered to the writer alone;
    # only the Partial sum needs the all-gather of full_tensor()
    for r in ranks:
        assert r["full_tensor_calls"] == [[2, 2]], r
    with bigmodel.open_checkpoint(out) as ckpt:
        saved = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}
    assert_same_state(saved, placements_full())


def test_an_hsdp_model_on_a_two_by_two_mesh_is_gathered_without_any_all_gather(tmp_path):
    from _dist_worker import placements_full
    from conftest import assert_same_state

    out = tmp_path / "out"
    ranks = run_ranks(
        "save-placements", tmp_path, {"out": str(out), "shard": "100B", "mesh": "2x2"}, world=4
    )
    for r in ranks:
        assert r["full_tensor_calls"] == [], r  # replicas send duplicates; none is all-gathered
    with bigmodel.open_checkpoint(out) as ckpt:
        saved = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}
    full = placements_full()
    assert_same_state(saved, {k: full[k] for k in ("uneven_rows", "ints", "one_row", "columns")})


def test_a_rank_failing_mid_save_raises_everywhere_and_keeps_the_old_checkpoint(tmp_path, folder):
    from conftest import assert_same_state

    torch.manual_seed(1)
    old = Net()
    out = tmp_path / "out"
    bigmodel.save_checkpoint(old, out, max_shard_size="12KB")
    before = sorted(p.name for p in out.iterdir())
    ranks = run_ranks("save-failing", folder, {"out": str(out), "bad_rank": 1})
    for r in ranks:
        assert r["raised"] == "DistributedError" and r["ranks"] == [1], r
        assert "No space left" in r["message"]
    assert sorted(p.name for p in out.iterdir()) == before  # staged files of both ranks removed
    with bigmodel.open_checkpoint(out) as ckpt:
        assert_same_state({k: ckpt.get_tensor(k) for k in ckpt.keys()}, old.state_dict())


def test_the_shard_writer_holds_at_most_one_waiting_shard_and_drains_after_a_failure():
    import threading

    from bigmodel.execution.distributed_save import _ShardWriter

    release = threading.Event()
    written = []

    def slow_write(index, tensors):
        release.wait(timeout=30)
        if index == 1:
            raise OSError(28, "No space left on device")
        written.append(index)

    writer = _ShardWriter(slow_write)
    writer.put(0, {})  # taken by the thread, which blocks in slow_write
    deadline = time.monotonic() + 10
    while writer._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.put(1, {})  # waits in the queue
    third = threading.Thread(target=writer.put, args=(2, {}))
    third.start()
    third.join(timeout=0.3)
    assert third.is_alive()  # a third shard is held back: gathering pauses for the writer
    release.set()
    third.join(timeout=10)
    writer.put(3, {})  # after the failure the queue still drains: the gathering never blocks
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert written == [0]  # nothing after the failed shard was written
