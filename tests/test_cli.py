import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import bigmodel
from bigmodel.cli import main
from conftest import assert_same_state, tiny_llama_config


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def llama(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie=True)).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(folder, max_shard_size="40KB")
    return model, folder


def _state(folder):
    with bigmodel.open_checkpoint(folder) as ckpt:
        return {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}


@pytest.mark.parametrize("command", ["demo", "inspect", "verify", "reshard", "convert", "estimate"])
def test_every_command_has_help_with_a_real_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out
    assert f"bigmodel {command}" in out


def test_usage_errors_exit_with_2_and_say_why(capsys, tmp_path):
    assert run(capsys, "nope")[0] == 2
    code, _, err = run(
        capsys, "reshard", tmp_path, tmp_path / "out", "--max-shard-size", "ten gigs"
    )
    assert code == 2
    assert "Invalid size 'ten gigs'" in err


def test_inspect_prints_layout_dtypes_files_and_the_largest_tensor(capsys, llama):
    _, folder = llama
    code, out, _ = run(capsys, "inspect", folder)
    assert code == 0
    assert "safetensors, sharded" in out
    assert "float32" in out
    assert "model.embed_tokens.weight" in out  # the largest tensor
    for shard in sorted(p.name for p in folder.glob("*.safetensors")):
        assert shard in out
    code, out, _ = run(capsys, "inspect", folder, "--json", "--tensors")
    data = json.loads(out)
    with bigmodel.open_checkpoint(folder) as ckpt:
        assert data["tensors"] == len(ckpt.stored_keys())
        assert data["total_bytes"] == ckpt.total_size
    assert {t["name"] for t in data["tensor_list"]} == set(_state(folder))
    assert data["parameters"] == sum(
        p.numel() for n, p in llama[0].state_dict().items() if n != "lm_head.weight"
    )


def test_inspect_reads_a_bin_file_too(capsys, tmp_path):
    torch.save({"w": torch.zeros(3, 4, dtype=torch.float16)}, tmp_path / "pytorch_model.bin")
    code, out, _ = run(capsys, "inspect", tmp_path / "pytorch_model.bin", "--tensors")
    assert code == 0
    assert "bin, single file" in out
    assert "float16" in out and "[3, 4]" in out


def test_verify_passes_an_intact_checkpoint_and_names_what_it_checked(capsys, tmp_path):
    bigmodel.save_checkpoint(
        {"a": torch.randn(64), "b": torch.randn(64)}, tmp_path, max_shard_size=300
    )
    code, out, _ = run(capsys, "verify", tmp_path)
    assert code == 0
    assert "ok         model-00001-of-00002.safetensors  (digest matches)" in out
    assert "intact" in out


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped"])
def test_verify_finds_damage_and_names_the_file(capsys, tmp_path, damage):
    result = bigmodel.save_checkpoint(
        {"a": torch.randn(64), "b": torch.randn(64)}, tmp_path, max_shard_size=300
    )
    victim = tmp_path / result.files[1]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif damage == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[-3] ^= 1
        victim.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", tmp_path)
    assert code == 1
    assert victim.name in err
    assert {
        "truncated": "[truncated]",
        "missing": "[missing-shard]",
        "flipped": "[digest-mismatch]",
    }[damage] in err
    code, out, _ = run(capsys, "verify", tmp_path, "--json")
    data = json.loads(out)
    assert code == 1 and not data["ok"]
    assert any(victim.name in p["file"] or victim.name in p["message"] for p in data["problems"])


def test_reshard_output_loads_in_transformers_with_the_same_tensors(capsys, llama, tmp_path):
    model, folder = llama
    code, out, _ = run(capsys, "reshard", folder, tmp_path / "one", "--max-shard-size", "1GB")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert "config.json" in out  # copied along
    assert_same_state(_state(tmp_path / "one"), _state(folder))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "one")
    assert_same_state(reloaded.state_dict(), model.state_dict())
    code, _, _ = run(
        capsys, "reshard", tmp_path / "one", tmp_path / "one", "--max-shard-size", "20KB"
    )
    assert code == 0
    assert len(list((tmp_path / "one").glob("model-*.safetensors"))) > 3
    assert not (tmp_path / "one" / "model.safetensors").exists()
    assert_same_state(_state(tmp_path / "one"), _state(folder))


def _bin_checkpoint(model, folder):
    """A legacy sharded .bin checkpoint as older transformers wrote it (both tied names kept)."""
    folder.mkdir()
    state = model.state_dict()
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    model.config.save_pretrained(folder)


def test_convert_turns_bin_shards_into_safetensors_that_transformers_loads(capsys, llama, tmp_path):
    model, _ = llama
    _bin_checkpoint(model, tmp_path / "bin")
    code, out, _ = run(
        capsys, "convert", tmp_path / "bin", tmp_path / "st", "--max-shard-size", "30KB"
    )
    assert code == 0
    assert "converted bin -> safetensors" in out
    assert not list((tmp_path / "st").glob("*.bin"))
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "st")
    assert_same_state(reloaded.state_dict(), model.state_dict())

    code, out, _ = run(capsys, "convert", tmp_path / "bin", tmp_path / "bf16", "--dtype", "bf16")
    assert code == 0
    converted = _state(tmp_path / "bf16")
    assert converted["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(
        converted["model.embed_tokens.weight"], model.model.embed_tokens.weight.to(torch.bfloat16)
    )


def test_convert_stores_tensors_shared_in_a_bin_once(capsys, tmp_path):
    w = torch.randn(4, 4)
    (tmp_path / "src").mkdir()
    torch.save({"embed.weight": w, "head.weight": w}, tmp_path / "src" / "pytorch_model.bin")
    code, out, _ = run(capsys, "convert", tmp_path / "src", tmp_path / "dst")
    assert code == 0
    assert "head.weight -> embed.weight" in out
    with bigmodel.open_checkpoint(tmp_path / "dst") as ckpt:
        assert ckpt.stored_keys() == ["embed.weight"]
        assert torch.equal(ckpt.get_tensor("head.weight"), w)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_convert_refuses_a_pickle_that_weights_only_refuses_and_writes_nothing(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    torch.save({"w": _Evil()}, tmp_path / "src" / "pytorch_model.bin")
    code, out, err = run(capsys, "convert", tmp_path / "src", tmp_path / "dst")
    assert code == 1
    assert "[unsafe-pickle]" in err and "weights_only" in err
    assert "pwned" not in out
    assert not (tmp_path / "dst").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_reads_a_dcp_folder_only_when_trusted(capsys, tmp_path):
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    state = {"model": {"w": torch.randn(4, 4), "ids": torch.arange(3)}, "step": 3}
    state_dict_saver.save(
        state, storage_writer=FileSystemWriter(str(tmp_path / "dcp")), no_dist=True
    )
    code, _, err = run(capsys, "convert", tmp_path / "dcp", tmp_path / "hf")
    assert code == 1 and "--trusted" in err and "[untrusted-pickle]" in err
    assert not (tmp_path / "hf").exists()
    code, out, _ = run(
        capsys,
        "convert",
        tmp_path / "dcp",
        tmp_path / "hf",
        "--trusted",
        "--prefix",
        "model.",
        "--json",
    )
    assert code == 0 and json.loads(out)["source_format"] == "dcp"
    with bigmodel.open_checkpoint(tmp_path / "hf") as ckpt:
        assert sorted(ckpt.keys()) == ["ids", "w"]
        assert torch.equal(ckpt.get_tensor("w"), state["model"]["w"])


def test_estimate_places_blocks_in_order_and_says_whether_they_fit(capsys, llama):
    _, folder = llama
    code, out, _ = run(capsys, "estimate", folder, "--max-memory", "cpu=40KB,disk", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["fits"]
    cpu, disk = data["devices"]
    assert cpu["device"] == "cpu" and disk["device"] == "disk"
    assert (
        cpu["blocks"][0] == "model.embed_tokens"
        and "model.layers.0" in cpu["blocks"] + disk["blocks"]
    )
    assert cpu["used"] <= 40_000
    assert cpu["used"] + disk["used"] == data["total_bytes"]
    code, out, _ = run(capsys, "estimate", folder, "--max-memory", "cpu=40KB,disk=0")
    assert code == 1
    assert "fits: no" in out and "Next:" in out
    code, out, _ = run(capsys, "estimate", folder, "--dtype", "bf16", "--json")
    assert json.loads(out)["total_bytes"] * 2 == data["total_bytes"]


def test_estimate_refuses_an_unknown_dtype_and_an_unlimited_cpu_as_usage_errors(capsys, llama):
    _, folder = llama
    code, _, err = run(capsys, "estimate", folder, "--dtype", "int8")
    assert code == 2
    assert "Unknown dtype 'int8'" in err and "bf16" in err
    code, _, err = run(capsys, "estimate", folder, "--max-memory", "cpu,disk")
    assert code == 2
    assert "only 'disk' may be unlimited" in err and "cpu=8GB" in err


def test_estimate_prints_the_plan_as_a_table(capsys, llama):
    _, folder = llama
    code, out, _ = run(capsys, "estimate", folder, "--max-memory", "cpu=40KB,disk")
    assert code == 0
    assert "largest block model.layers.0" in out
    assert "model.layers.0..1" in out and "fits: yes" in out


def test_demo_runs_end_to_end_and_both_workflows_agree(capsys, tmp_path):
    keep = tmp_path / "demo-ckpt"
    code, out, _ = run(capsys, "demo", "--size", "20MB", "--json", "--keep", keep)
    assert code == 0
    data = json.loads(out)
    assert data["outputs_match"] is True
    assert data["checkpoint"]["shards"] >= 4
    # --keep keeps the checkpoint, and only the checkpoint: the demo's own files live elsewhere.
    shards = [p.name for p in keep.glob("model-*.safetensors")]
    assert sorted(p.name for p in keep.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json"]
    )
    assert len(shards) == data["checkpoint"]["shards"]
    assert set(data["results"]) == {"bigmodel", "naive"}
    # The naive workflow holds the weights in private memory; bigmodel maps them from the files.
    assert data["results"]["bigmodel"]["anon"] < data["results"]["naive"]["anon"]


def test_the_installed_entry_point_and_python_dash_m_both_work(tmp_path):
    bigmodel.save_checkpoint({"w": torch.ones(2, 2)}, tmp_path)
    script = shutil.which("bigmodel", path=str(Path(sys.executable).parent))
    assert script is not None
    out = subprocess.run(
        [script, "inspect", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout)["tensors"] == 1
    out = subprocess.run(
        [sys.executable, "-m", "bigmodel", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "intact" in out.stdout


# -- output other programs and terminals read ------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "verify", "estimate"])
def test_every_json_run_prints_exactly_one_json_document_even_when_it_fails(
    capsys, tmp_path, command
):
    code, out, err = run(capsys, command, tmp_path / "missing", "--json")
    assert code == 1
    document = json.loads(out)  # exactly one document: trailing text would not parse
    assert document["ok"] is False
    assert document["error"]["type"] == "CheckpointNotFoundError"
    assert "missing" in document["error"]["message"]
    assert "missing" in err


def test_a_non_finite_number_in_an_index_is_a_file_problem_and_never_reaches_json_output(
    capsys, tmp_path
):
    bigmodel.save_checkpoint(
        {"a": torch.ones(64), "b": torch.ones(64)}, tmp_path, max_shard_size="300B"
    )
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"total_size": 512', '"total_size": NaN'))
    code, out, _ = run(capsys, "inspect", tmp_path, "--json")
    assert code == 1
    document = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
    assert document["error"]["code"] == "index-not-json"


def test_inspect_escapes_control_characters_from_names_and_metadata(capsys, tmp_path):
    name = "evil\x1b]0;owned\x07.weight"
    bigmodel.save_checkpoint({name: torch.ones(2)}, tmp_path, metadata={"note": "\x1b[2J clear"})
    code, out, _ = run(capsys, "inspect", tmp_path, "--tensors")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b]0;owned\\x07.weight" in out
    assert "\\x1b[2J clear" in out


def test_a_tensor_name_that_is_not_valid_utf8_is_a_file_problem_not_a_usage_error(capsys, tmp_path):
    header = b'{"w\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    header += b" " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4
    )
    for command in ("inspect", "verify"):
        code, _, err = run(capsys, command, tmp_path)
        assert code == 1, err
        assert "bad-name" in err
        assert "\\ud800" in err


def test_the_estimate_table_names_every_block_of_a_device_runs_of_layers_compacted():
    from bigmodel.cli.estimate import _compact

    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in (0, 1, 2, 5)), "model.norm"]
    assert _compact(names) == "model.embed_tokens, model.layers.0..2, model.layers.5, model.norm"
    assert _compact([f"h.{i}" for i in range(0, 20, 2)], limit=3) == "h.0, h.2, h.4, ... (+7)"
