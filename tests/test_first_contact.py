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


# -- the first empty build ---------------------------------------------------------------------
EMPTY_BUILD_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import bigmodel

    class Rotary(nn.Module):
        def __init__(self, dim):
            super().__init__()
            inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
            self.register_buffer("inv_freq", inv, persistent=False)
            self.register_buffer("scale", nn.init.ones_(torch.empty(dim)))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16, padding_idx=0)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.up = nn.Linear(16, 64)
            self.rotary = Rotary(8)

    with bigmodel.init_empty_weights():
        model = Model()
    compiler = sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)
    assert not compiler, f"the first empty build imported {compiler}"
    assert all(p.is_meta for p in model.parameters())
    expected = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.equal(model.rotary.inv_freq, expected)
    assert torch.equal(model.rotary.scale, torch.ones(8))  # a real tensor is still initialised
    print("ok")
    """
)


def test_the_first_empty_build_in_a_process_does_not_import_torchs_compiler():
    out = subprocess.run(
        [sys.executable, "-c", EMPTY_BUILD_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_initialisers_are_put_back_exactly_after_nested_contexts_and_errors():
    from torch import nn

    before = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_")}
    with bigmodel.init_empty_weights():
        patched = nn.init.normal_
        assert patched is not before["normal_"]
        with bigmodel.init_empty_weights(include_buffers=True):
            assert nn.init.normal_(torch.empty(2, device="meta")).is_meta
        assert nn.init.normal_ is patched  # the inner context restored the outer's
        with pytest.raises(RuntimeError), bigmodel.init_empty_weights():
            raise RuntimeError("a constructor failed")
        assert nn.init.normal_ is patched
    assert {name: getattr(nn.init, name) for name in before} == before
    with bigmodel.init_on_device("cpu"):  # a real device initialises as usual
        torch.manual_seed(0)
        layer = nn.Linear(4, 4)
    torch.manual_seed(0)
    assert torch.equal(layer.weight, nn.Linear(4, 4).weight)


def test_non_persistent_buffers_keep_their_values_when_buffers_go_to_meta_too():
    from torch import nn

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
            self.register_buffer("inv_freq", inv, persistent=False)
            self.register_buffer("table", torch.arange(4.0))

    with bigmodel.init_empty_weights(include_buffers=True):
        module = Rotary()
    assert torch.equal(module.inv_freq, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    assert module.table.is_meta


def test_the_quickstart_times_both_ways_to_a_first_output_and_they_agree():
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "quickstart.py"
    out = subprocess.run(
        [sys.executable, str(script), "--vocab", "256", "--hidden", "64", "--layers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "built with random init, loaded, first output:" in out.stdout
    assert (
        "built empty, weights mapped from the files (from_pretrained), first output:" in out.stdout
    )
    assert "outputs match the original model: True" in out.stdout


# -- the demo ----------------------------------------------------------------------------------
def test_demo_help_is_plain_text(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    assert "from_pretrained" in out


def test_demo_headlines_time_to_a_first_output_and_says_why_the_lazy_load_is_cheap(capsys):
    from bigmodel.cli.demo import _print_report

    row = {"anon": 0, "rss": 0, "match": True}
    results = {
        "bigmodel": {**row, "load_s": 0.01, "total_s": 0.5},
        "naive": {**row, "load_s": 0.9, "total_s": 1.0, "anon": 10**9},
    }
    model = {"parameters": 10**6, "bytes": 4 * 10**6, "layers": 1, "hidden": 8}
    _print_report(model, {"shards": 2, "save_s": 0.1, "folder": None}, results)
    out = capsys.readouterr().out
    assert (
        "Time to a first output (load + forward): bigmodel 0.50s, naive 1.00s (2.0x faster)" in out
    )
    assert "pages are read when the forward pass first touches them" in out
    assert "0.011x" not in out and "the time of the naive workflow" not in out


# -- README claims -----------------------------------------------------------------------------
def test_verify_reports_a_truncated_shard_and_a_corrupt_one_together(capsys, tmp_path):
    state = {name: torch.randn(64) for name in ("a", "b", "c")}
    files = bigmodel.save_checkpoint(state, tmp_path, max_shard_size=300).files
    truncated, corrupt = tmp_path / files[0], tmp_path / files[2]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    data = bytearray(corrupt.read_bytes())
    data[-3] ^= 1
    corrupt.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s) found" in err
    assert f"{truncated.name}" in err and "[truncated]" in err
    assert f"{corrupt.name}" in err and "[digest-mismatch]" in err
    assert main(["verify", str(tmp_path), "--json"]) == 1
    data_out = json.loads(capsys.readouterr().out)
    assert {p["code"] for p in data_out["problems"]} == {"truncated", "digest-mismatch"}
    assert data_out["verified"] == [files[1]]


def _tied():
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(256, 32)
            self.head = nn.Linear(32, 256, bias=False)
            self.head.weight = self.embed.weight

    return Tied()


def _bytes_on_disk(folder):
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def test_tied_weights_are_stored_once_in_safetensors_and_by_name_in_bin_files(tmp_path):
    """What the README may claim: safetensors stores a tie once (an alias); a .bin writes both
    names, one storage inside one file, twice across shards."""
    model, tensor_bytes = _tied(), 256 * 32 * 4
    safe = bigmodel.save_checkpoint(model, tmp_path / "safe", max_shard_size=tensor_bytes)
    assert safe.aliases == {"head.weight": "embed.weight"}
    assert _bytes_on_disk(tmp_path / "safe") < 1.1 * tensor_bytes
    one_bin = bigmodel.save_checkpoint(model, tmp_path / "bin", safe_serialization=False)
    assert one_bin.aliases == {}
    with bigmodel.open_checkpoint(tmp_path / "bin") as ckpt:
        assert sorted(ckpt.stored_keys()) == ["embed.weight", "head.weight"]
    assert _bytes_on_disk(tmp_path / "bin") < 1.1 * tensor_bytes  # torch.save shares storage
    bigmodel.save_checkpoint(
        model, tmp_path / "bins", safe_serialization=False, max_shard_size=tensor_bytes
    )
    assert _bytes_on_disk(tmp_path / "bins") > 2 * tensor_bytes  # one copy per shard


def test_converting_a_dcp_folder_keeps_each_tied_name_as_its_own_tensor(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    weight = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns about running without a process group
        dcp.save({"embed.weight": weight, "head.weight": weight}, checkpoint_id=tmp_path / "dcp")
    assert main(["convert", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--trusted", "-q"]) == 0
    with bigmodel.open_checkpoint(tmp_path / "hf") as ckpt:
        assert sorted(ckpt.stored_keys()) == ["embed.weight", "head.weight"]
        assert ckpt.aliases == {}


def test_reshard_copies_files_and_metadata_and_names_what_it_did_not_copy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    bigmodel.save_checkpoint(
        {"a": torch.randn(64), "b": torch.randn(64)},
        src,
        max_shard_size=300,
        metadata={"note": "kept"},
    )
    (src / "config.json").write_text('{"new": true}')
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    dst.mkdir()
    (dst / "config.json").write_text('{"old": true}')
    with pytest.warns(
        UserWarning, match=r"kept .*config\.json.*did not copy the folder\(s\) 1_Pooling/"
    ):
        assert main(["reshard", str(src), str(dst), "--max-shard-size", "1GB", "-q"]) == 0
    assert (dst / "tokenizer.json").exists() and not (dst / "1_Pooling").exists()
    assert (dst / "config.json").read_text() == '{"old": true}'
    with bigmodel.open_checkpoint(dst) as ckpt:
        assert ckpt.metadata["note"] == "kept"
