"""The training-save benchmark keeps working (smoke run on a tiny model; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train_save.py"


def test_the_train_save_benchmark_runs_every_method_and_writes_its_table(tmp_path):
    out = tmp_path / "train_save.md"
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "4", "--every", "2"]
    command += ["--root", str(tmp_path), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    table = out.read_text()
    for row in ("| bigmodel sync |", "| bigmodel background |", "| dcp async_save |"):
        assert row in table
    assert "background stall / sync save stall" in table
