"""The two-rank save benchmark keeps working (smoke run on a tiny model; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_dist_save.py"


def test_the_two_rank_save_benchmark_runs_both_methods_and_writes_its_table(tmp_path):
    out = tmp_path / "train_save_distributed.md"
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--saves", "2", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    table = out.read_text()
    for row in ("| bigmodel sync (collective) |", "| bigmodel background (side group) |"):
        assert row in table
    assert "background stall / sync stall" in table
    assert "staging buffer per rank" in table
