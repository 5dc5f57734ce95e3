"""Gloo groups on CPU, each rank a real subprocess: replicated and sharded loads and saves, errors.

The scenarios share one pair of long-lived ranks (the ``ranks`` fixture, tests/_ranks.py), each
run in turn in the same process group, so the module pays torch's import and the group's set-up
once, not once a test. Only the four-rank HSDP save starts ranks of its own (``run_ranks``).
"""

import time

import pytest
import torch

import bigmodel
from _dist_worker import Net
from _ranks import net_folder_fixture, ranks_fixture, run_ranks  # noqa: F401


def test_replicated_cpu_loads_map_the_same_files_on_every_rank(ranks, net_folder):
    for r in ranks.run("replicated", net_folder, {"strategy": "auto"}):
        assert r["equal"] and r["tied"]
        assert r["bytes_read"] == r["total"]
        assert r["up_weight_file"].startswith(str(net_folder)), r  # a view of the shard, no copy


def test_a_cpu_conversion_is_done_once_per_node_in_shared_memory_and_mapped_by_every_rank(
    ranks, net_folder
):
    results = ranks.run("replicated", net_folder, {"strategy": "auto", "dtype": "bfloat16"})
    for r in results:
        assert r["equal"] and r["tied"]
        assert r["dtypes"] == ["torch.bfloat16", "torch.int64"]
        # the weight is a view of the node's converted file (unlinked once every rank mapped it)
        assert "bigmodel-" in r["up_weight_file"] and "(deleted)" in r["up_weight_file"], r
    assert results[1]["bytes_read"] < results[0]["bytes_read"]  # only the node's leader converted


@pytest.mark.parametrize("strategy", ["scatter", "rank0"])
def test_scatter_and_rank0_read_each_byte_once_and_broadcast(ranks, net_folder, strategy):
    results = ranks.run("replicated", net_folder, {"strategy": strategy, "dtype": "bfloat16"})
    assert all(r["equal"] and r["tied"] for r in results)
    total = results[0]["total"]
    assert sum(r["bytes_read"] for r in results) == total
    if strategy == "scatter":
        assert all(r["bytes_read"] < 0.7 * total for r in results), results
    else:
        assert results[1]["bytes_read"] == 0


@pytest.mark.parametrize("how", ["fsdp", "tp"])
def test_dtensor_parameters_get_only_their_slice_and_gather_to_the_checkpoint(
    ranks, net_folder, how
):
    results = ranks.run("sharded", net_folder, {"how": how})
    for r in results:
        assert r["equal"] and r["same_output"], r
        assert r["sharded"], r
    # each rank read about half of every sharded tensor, never the whole
    assert sum(r["bytes_read"] for r in results) < 2 * results[0]["total"]
    for r in results:
        assert r["bytes_read"] <= r["total"] - 0.4 * r["sharded_bytes"], r


MOE = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_local_experts=4,
    num_experts_per_tok=2,
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_experts_of_an_fsdp_model_are_built_per_rank_from_only_their_experts(
    ranks, tmp_path, dtype
):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "original"
    MixtralForCausalLM(MixtralConfig(**MOE)).save_pretrained(folder)  # one tensor per expert
    results = ranks.run("sharded-moe", folder, {"config": MOE, "dtype": dtype})
    for r in results:
        assert r["equal"], r["unequal"]
        assert len(r["converted"]) == 4
        assert r["local_rows"] == 2  # 4 experts over 2 ranks: each builds only its 2
    with bigmodel.open_checkpoint(folder) as ckpt:
        total = ckpt.total_size
    # each rank read about half of the checkpoint (its experts and its rows), never all of it
    assert all(r["bytes_read"] < 0.75 * total for r in results), (results, total)


def test_a_sharded_parameter_missing_from_the_checkpoint_is_an_error_on_every_rank(
    ranks, net_folder, tmp_path
):
    for r in ranks.run("sharded-missing", net_folder, {"partial": str(tmp_path / "partial")}):
        assert r["raised"] == "MetaTensorError" and "up.weight" in r["message"], r


@pytest.mark.parametrize("strategy", ["auto", "scatter"])
def test_a_failure_on_one_rank_raises_on_every_rank_and_names_it_and_the_group_goes_on(
    ranks, net_folder, strategy
):
    for r in ranks.run("failing", net_folder, {"bad_rank": 1, "strategy": strategy}):
        assert r["raised"] == "DistributedError", r
        assert r["ranks"] == [1]
        assert "-missing" in r["message"] and "rank 1" in r["message"]
    assert [r["sum"] for r in ranks.run("ping", net_folder)] == [
        3,
        3,
    ]  # no rank left mid-collective


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
def test_an_fsdp_model_saved_from_two_ranks_is_one_checkpoint_transformers_loads(ranks, tmp_path):
    import shutil

    from transformers import LlamaForCausalLM

    from conftest import assert_same_state, tiny_llama_config

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(tie=False)).eval()
    reference.save_pretrained(tmp_path / "ref")
    out = tmp_path / "out"
    results = ranks.run(
        "save-llama", tmp_path / "ref", {"out": str(out), "shard": "40KB"}, timeout=120
    )
    assert results[0]["files"] == results[1]["files"] and len(results[0]["files"]) > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        results[0]["files"] + [results[0]["index"]]
    )  # no temporary files left
    shutil.copy(tmp_path / "ref" / "config.json", out)
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert_same_state(loaded.state_dict(), reference.state_dict())
    with bigmodel.open_checkpoint(out) as ckpt:
        assert ckpt.verify().problems == []  # each rank's digests reached the index


def test_each_dtensor_travels_once_to_the_rank_that_writes_it_whatever_its_placement(
    ranks, tmp_path
):
    from _dist_worker import placements_full
    from conftest import assert_same_state

    out = tmp_path / "out"
    results = ranks.run("save-placements", tmp_path, {"out": str(out), "shard": "100B"})
    assert results[0]["files"] == results[1]["files"] and len(results[0]["files"]) > 2
    # Shard (even, uneven, empty on a rank) and Replicate are gathered to the writer alone;
    # only the Partial sum needs the all-gather of full_tensor()
    for r in results:
        assert r["full_tensor_calls"] == [[2, 2]], r
    with bigmodel.open_checkpoint(out) as ckpt:
        saved = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}
    assert_same_state(saved, placements_full())


def test_an_hsdp_model_on_a_two_by_two_mesh_is_gathered_without_any_all_gather(tmp_path):
    from _dist_worker import placements_full
    from conftest import assert_same_state

    out = tmp_path / "out"
    # four ranks, not the shared two: a group's world size is fixed when it is set up
    results = run_ranks(
        "save-placements", tmp_path, {"out": str(out), "shard": "100B", "mesh": "2x2"}, world=4
    )
    for r in results:
        assert r["full_tensor_calls"] == [], r  # replicas send duplicates; none is all-gathered
    with bigmodel.open_checkpoint(out) as ckpt:
        saved = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}
    full = placements_full()
    assert_same_state(saved, {k: full[k] for k in ("uneven_rows", "ints", "one_row", "columns")})


def test_a_rank_failing_mid_save_raises_everywhere_and_keeps_the_old_checkpoint(
    ranks, tmp_path, net_folder
):
    from conftest import assert_same_state

    torch.manual_seed(1)
    old = Net()
    out = tmp_path / "out"
    bigmodel.save_checkpoint(old, out, max_shard_size="12KB")
    before = sorted(p.name for p in out.iterdir())
    for r in ranks.run("save-failing", net_folder, {"out": str(out), "bad_rank": 1}):
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
