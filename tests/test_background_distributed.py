"""Background saves under torch.distributed: two gloo ranks in subprocesses, FSDP2 models.

Each rank stages its own shards and returns; a worker thread per rank gathers, writes and
commits over a side group while the training loop keeps running collectives on the default
group; a failure on one rank reaches every rank's handle.
"""

import sys
from pathlib import Path

import pytest
import torch

import bigmodel
from _dist_worker import Net
from _ranks import free_port, net_folder_fixture, ranks_fixture  # noqa: F401
from conftest import assert_same_state, tiny_llama_config


def _previous_checkpoint(tmp_path):
    """(the model, its folder, the folder's listing) of the checkpoint a failed save must keep."""
    torch.manual_seed(1)
    old = Net()
    out = tmp_path / "out"
    bigmodel.save_checkpoint(old, out, max_shard_size="12KB")
    return old, out, sorted(p.name for p in out.iterdir())


def _assert_untouched_and_group_alive(ranks, net_folder, old, out, before):
    assert sorted(p.name for p in out.iterdir()) == before  # both ranks' staged files removed
    assert_same_state(_loaded(out), old.state_dict())
    assert [r["sum"] for r in ranks.run("ping", net_folder)] == [3, 3]  # the group goes on


def _loaded(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}


def test_an_fsdp_background_save_holds_the_weights_of_the_call_while_training_goes_on(
    ranks, tmp_path
):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config(tie=False)).eval()
    reference.save_pretrained(tmp_path / "ref")
    out = tmp_path / "out"
    results = ranks.run(
        "bg-save-llama", tmp_path / "ref", {"out": str(out), "shard": "40KB"}, timeout=120
    )
    for r in results:
        assert r["staged"] and not r["done_early"], r  # returned once staged, before durable
        assert r["writer_was_held"], r  # the worker was mid-save while the loop trained
        assert r["all_reduce"] == 3.0 * 2**4, r  # the default group's collectives went on
        assert r["changed"], r  # the optimizer changed the weights right after the call
    assert results[0]["files"] == results[1]["files"] and len(results[0]["files"]) > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        results[0]["files"] + [results[0]["index"]]
    )
    assert_same_state(_loaded(out), reference.state_dict())  # the values at the call
    with bigmodel.open_checkpoint(out) as ckpt:
        assert ckpt.verify().problems == []
    (out / "config.json").write_bytes((tmp_path / "ref" / "config.json").read_bytes())
    loaded = LlamaForCausalLM.from_pretrained(out).eval()  # a plain HF folder
    assert_same_state(loaded.state_dict(), reference.state_dict())


@pytest.mark.parametrize("fail", ["write", "stage"])
def test_one_rank_failing_a_background_save_raises_on_every_handle_and_keeps_the_old_checkpoint(
    ranks, tmp_path, net_folder, fail
):
    old, out, before = _previous_checkpoint(tmp_path)
    results = ranks.run(
        "bg-save-failing", net_folder, {"out": str(out), "bad_rank": 1, "fail": fail}
    )
    for r in results:
        assert r["raised"] == "DistributedError" and r["ranks"] == [1], r
        expected = "No space left" if fail == "write" else "staging buffer"
        assert expected in r["message"] and "rank 1" in r["message"], r
    # rank 1's own error is chained on rank 1; rank 0 had none
    assert results[1]["cause"] == ("OSError" if fail == "write" else "MemoryError")
    assert results[0]["cause"] is None
    _assert_untouched_and_group_alive(ranks, net_folder, old, out, before)


def test_a_repeated_background_save_runs_no_collective_in_the_calling_thread_and_reuses_its_plan(
    ranks, tmp_path, net_folder
):
    results = ranks.run("bg-save-replan", net_folder, {"out": str(tmp_path / "out")})
    for r in results:
        assert r["equal"] == [True, True, True], r  # each holds the values of its call
        first, *repeated = r["calls"]
        assert first[0] == [], r  # planned alone: the workers compare the plans
        assert repeated == [[[], 0], [[], 0]], r  # no collective, no piece recomputed


@pytest.mark.parametrize("background", [True, False])
def test_ranks_that_plan_a_save_differently_fail_every_rank_instead_of_writing_a_wrong_checkpoint(
    ranks, tmp_path, net_folder, background
):
    old, out, before = _previous_checkpoint(tmp_path)
    results = ranks.run("bg-save-mismatch", net_folder, {"out": str(out), "background": background})
    for r in results:
        assert r["raised"] == "DistributedError" and r["ranks"] == [1], r
        assert "planned other files than rank 0" in r["message"], r
        assert "Fix: " in r["message"], r
    _assert_untouched_and_group_alive(ranks, net_folder, old, out, before)


def test_the_manager_saves_rotates_and_restores_an_fsdp_model_and_its_optimizer_on_two_ranks(
    ranks, tmp_path
):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie=False)).save_pretrained(tmp_path / "ref")
    root = tmp_path / "run"
    results = ranks.run("manager", tmp_path / "ref", {"root": str(root)}, timeout=120)
    for r in results:
        assert r["steps"] == [2, 3] and r["latest"] == 3, r  # the same on every rank
        assert r["restored"] == [3, {"step": 3}], r
        assert r["exp_avg_is_sharded"], r  # each rank keeps only its slice of the state
        assert r["resumed"] == pytest.approx(r["uninterrupted"], abs=1e-6), r
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    # the step folder is a plain HF folder; the optimizer state holds whole tensors by name
    LlamaForCausalLM.from_pretrained(root / "step-3")
    with bigmodel.open_checkpoint(root / "step-3" / "optimizer.safetensors") as ckpt:
        shapes = {k: list(ckpt.tensor_info(k).shape) for k in ckpt.keys()}
    assert shapes["state.lm_head.weight.exp_avg"] == [128, 32], shapes


KILL_WORKER = Path(__file__).with_name("_dist_kill.py")


def _run_killed_pair(folder, kill_at):
    """Start the two ranks of _dist_kill.py; rank 1 SIGKILLs itself at ``kill_at``. A rank still
    running after the deadline is killed and fails the test (a hang, not a pass)."""
    import json
    import os
    import subprocess

    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(KILL_WORKER), str(rank), str(port), str(folder), kill_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    outputs = []
    for rank, proc in enumerate(procs):
        try:
            outputs.append(proc.communicate(timeout=90))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            pytest.fail(f"rank {rank} did not exit within 90 s after rank 1 was killed")
    codes = [proc.returncode for proc in procs]
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("RESULT ")]
    assert lines, f"rank 0 (exit {codes[0]}) reported nothing; stderr:\n{outputs[0][1][-3000:]}"
    return codes, json.loads(lines[0][len("RESULT ") :])


@pytest.mark.parametrize("kill_at", ["write", "publish"])
def test_a_rank_killed_mid_background_save_fails_the_survivors_handle_and_keeps_the_old_checkpoint(
    tmp_path, kill_at
):
    import signal

    torch.manual_seed(0)
    old = Net()
    out = tmp_path / "out"
    bigmodel.save_checkpoint(old, out, max_shard_size="12KB")
    before = sorted(p.name for p in out.iterdir())
    codes, result = _run_killed_pair(out, kill_at)
    assert codes == [0, -signal.SIGKILL], result  # the survivor exited on its own
    assert result["raised"] == "DistributedError" and result["ranks"] == [1], result
    message = result["message"]
    assert "rank 1: disconnected from the background-save side group" in message, message
    assert "Fix: " in message and "restart every rank" in message, message
    assert result["files"] == before  # no temporary file of the failed save is left
    assert_same_state(_loaded(out), old.state_dict())  # the previous checkpoint still loads
