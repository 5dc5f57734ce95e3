"""The benchmark scripts keep working (smoke run on a tiny model; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_load.py"


def test_the_load_benchmark_runs_end_to_end_and_writes_its_table(tmp_path):
    out = tmp_path / "load.md"
    subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size",
            "tiny",
            "--repeats",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = out.read_text()
    for row in (
        "| fp32 | bigmodel |",
        "| fp32 | transformers |",
        "| fp32 | naive |",
        "| bf16 | bigmodel |",
        "construction under init_empty_weights",
    ):
        assert row in table
    assert (tmp_path / "cache" / "llama-tiny" / "model.safetensors.index.json").exists()


def test_the_integrity_benchmark_runs_end_to_end_and_refuses_every_hostile_file(tmp_path):
    out = tmp_path / "integrity.md"
    bench = BENCH.with_name("bench_integrity.py")
    subprocess.run(
        [
            sys.executable,
            str(bench),
            "--size",
            "tiny",
            "--repeats",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = out.read_text()
    assert "| fp32 |" in table and "| bf16 |" in table
    assert "0 escaped" in table
    assert "code-execution payload ran: no" in table
