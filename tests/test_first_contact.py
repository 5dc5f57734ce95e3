"""The first minutes with bigmodel: a command line that answers without importing torch, that
behaves under a pipe and refuses nonsense sizes, and an empty build that costs nothing the
first time either."""

import json
import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
import torch

import bigmodel
from bigmodel.cli import main

#: Runs ``python -m bigmodel ARGS`` in this process, then reports whether torch was imported.
CLI_PROBE = textwrap.dedent(
    """
    import runpy, sys
    sys.argv = ["bigmodel", *sys.argv[1:]]
    try:
        runpy.run_module("bigmodel", run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
    sys.exit(code)
    """
)


def _cli(*argv, probe=CLI_PROBE):
    return subprocess.run(
        [sys.executable, "-c", probe, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def checkpoint(tmp_path):
    state = {"a": torch.randn(64), "b": torch.randn(8, 8).to(torch.bfloat16), "n": torch.arange(5)}
    bigmodel.save_checkpoint(state, tmp_path / "ckpt", max_shard_size=300)
    return tmp_path / "ckpt"


@pytest.mark.parametrize(
    "argv",
    [
        ("inspect", "{ckpt}"),
        ("inspect", "{ckpt}", "--json", "--tensors"),
        ("verify", "{ckpt}"),
        ("verify", "{ckpt}", "--json"),
    ],
)
def test_inspect_and_verify_answer_without_importing_torch(checkpoint, argv):
    out = _cli(*(a.format(ckpt=checkpoint) for a in argv))
    assert out.returncode == 0, out.stderr
    assert "torch imported: False" in out.stderr


def test_inspect_describes_dtypes_shapes_and_sizes_from_the_header_as_torch_would(checkpoint):
    out = _cli("inspect", checkpoint, "--json", "--tensors")
    data = json.loads(out.stdout)
    listed = {t["name"]: t for t in data["tensor_list"]}
    with bigmodel.open_checkpoint(checkpoint) as ckpt:
        for name in ckpt.keys():
            info = ckpt.tensor_info(name)
            assert listed[name]["dtype"] == str(info.dtype).removeprefix("torch.")
            assert listed[name]["shape"] == list(info.shape)
            assert listed[name]["bytes"] == info.nbytes == ckpt.nbytes(name)
        assert data["total_bytes"] == ckpt.total_size


def test_a_damaged_checkpoint_is_reported_without_importing_torch(checkpoint):
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    out = _cli("verify", checkpoint)
    assert out.returncode == 1
    assert "[digest-mismatch]" in out.stderr and shard.name in out.stderr
    assert "torch imported: False" in out.stderr


def test_the_package_imports_its_names_on_first_use_and_still_lists_them():
    probe = textwrap.dedent(
        """
        import sys
        import bigmodel
        assert "torch" not in sys.modules, "import bigmodel imported torch"
        assert set(bigmodel.__all__) <= set(dir(bigmodel))
        from bigmodel import load_checkpoint
        assert bigmodel.load_checkpoint is load_checkpoint
        assert "torch" in sys.modules
        try:
            bigmodel.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("an unknown name must raise AttributeError")
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_version_prints_the_installed_distribution_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bigmodel {version('bigmodel')}"


def test_output_cut_short_by_head_ends_quietly_without_a_traceback(tmp_path):
    state = {f"layer.{i}.weight": torch.zeros(1) for i in range(3000)}
    bigmodel.save_checkpoint(state, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigmodel", "inspect", str(tmp_path), "--tensors"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -1`: read a line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # as if killed by SIGPIPE, like any Unix tool
    assert err == ""


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("demo", "--size", "0"), "above 0"),
        (("demo", "--size=-1GB"), "Invalid size '-1GB'"),
        (("demo", "--size", "-1"), "Invalid size '-1'"),
        (("demo", "--size", "-1GB"), "expected one argument"),  # argparse: an option?
        (("demo", "--size", "lots"), "Invalid size 'lots'"),
        (("reshard", "a", "b", "--max-shard-size", "0"), "above 0"),
        (("reshard", "a", "b", "--max-shard-size", "0GB"), "above 0"),
        (("convert", "a", "b", "--max-shard-size=-5MB"), "Invalid size '-5MB'"),
        (("convert", "a", "b", "--max-shard-size", "5 parsecs"), "unknown unit"),
    ],
)
def test_zero_negative_and_garbage_sizes_are_usage_errors(capsys, argv, said):
    assert main(list(argv)) == 2
    assert said in capsys.readouterr().err
