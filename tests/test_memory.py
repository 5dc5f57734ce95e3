"""Peak anonymous memory of saves and loads, measured in fresh subprocesses (Linux only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc (Linux)"
)

PROBE = Path(__file__).with_name("_memory_probe.py")
SLACK = 24 * 2**20  # allocator and interpreter noise


def _probe(mode, folder):
    out = subprocess.run(
        [sys.executable, str(PROBE), mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One measured save (a fresh subprocess): its numbers, and the checkpoint the loads read."""
    folder = tmp_path_factory.mktemp("memory")
    return _probe("save", folder), folder


@pytest.fixture(scope="module")
def checkpoint(saved):
    return saved[1]


def test_saving_a_model_in_ram_spends_far_less_than_one_tensor_extra(saved):
    m, _ = saved
    assert m["extra_peak"] < m["tensor"] // 4 + SLACK, m


def test_saving_non_contiguous_tensors_holds_at_most_one_copy_at_a_time(tmp_path):
    m = _probe("save-strided", tmp_path)
    assert m["extra_peak"] < m["tensor"] + SLACK, m


def test_loading_into_a_built_model_holds_at_most_one_tensor_not_a_shard(checkpoint):
    m = _probe("load-built", checkpoint)
    assert m["extra_peak"] < m["tensor"] + SLACK, m


def test_loading_into_a_meta_model_with_the_same_dtype_spends_no_anonymous_memory(checkpoint):
    m = _probe("load-meta", checkpoint)
    assert m["extra_peak"] < SLACK, m


def test_loading_with_a_dtype_change_costs_the_converted_model_and_nothing_more(checkpoint):
    m = _probe("load-meta-bf16", checkpoint)
    converted = m["total"] // 2
    assert m["extra_after"] < converted + SLACK, m
    assert m["extra_peak"] < converted + m["tensor"] + SLACK, m


def test_assigning_into_a_built_model_releases_its_old_weights(checkpoint):
    m = _probe("assign-built", checkpoint)
    assert m["extra_peak"] < SLACK, m
    assert m["extra_after"] < -m["total"] + SLACK, (
        m
    )  # the random init is freed; weights alias the file
