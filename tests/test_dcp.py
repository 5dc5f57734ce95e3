"""torch.distributed.checkpoint folders to the Hugging Face layout and back."""

import re

import pytest
import torch

import bigmodel
from conftest import assert_same_state


def _training_state():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "embed.weight": torch.randn(40, 16, generator=g),
            "layers.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "layers.0.positions": torch.arange(12, dtype=torch.int64),
            "layers.0.mask": torch.rand(4, 4, generator=g) > 0.5,
            "layers.0.codes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        },
        "step": 7,
    }


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def dcp_folder(tmp_path):
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    folder = tmp_path / "dcp"
    state_dict_saver.save(
        _training_state(), storage_writer=FileSystemWriter(str(folder)), no_dist=True
    )
    return folder


def test_a_dcp_folder_becomes_a_sharded_hf_checkpoint_with_int_and_bool_tensors(
    dcp_folder, tmp_path
):
    result = bigmodel.dcp_to_hf(
        dcp_folder, tmp_path / "hf", trusted=True, prefix="model.", max_shard_size="1KB"
    )
    assert result.index_file is not None and len(result.files) > 1
    with bigmodel.open_checkpoint(tmp_path / "hf", verify=True) as ckpt:
        loaded = {k: ckpt.get_tensor(k) for k in ckpt.keys()}
    assert_same_state(loaded, _training_state()["model"])
    assert loaded["layers.0.mask"].dtype == torch.bool


def test_an_hf_checkpoint_round_trips_through_dcp_unchanged(dcp_folder, tmp_path):
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    bigmodel.dcp_to_hf(dcp_folder, tmp_path / "hf", trusted=True, prefix="model.")
    bigmodel.hf_to_dcp(tmp_path / "hf", tmp_path / "dcp2", prefix="model.")
    expected = _training_state()["model"]
    state = {"model." + k: torch.empty_like(v) for k, v in expected.items()}
    state_dict_loader.load(
        state, storage_reader=FileSystemReader(str(tmp_path / "dcp2")), no_dist=True
    )
    assert_same_state({k.removeprefix("model."): v for k, v in state.items()}, expected)
    # and back again: the same tensors, bit for bit
    bigmodel.dcp_to_hf(tmp_path / "dcp2", tmp_path / "hf2", trusted=True, prefix="model.")
    with bigmodel.open_checkpoint(tmp_path / "hf2") as ckpt:
        assert_same_state({k: ckpt.get_tensor(k) for k in ckpt.keys()}, expected)


def test_reading_dcp_metadata_needs_trust_because_it_is_a_pickle(dcp_folder, tmp_path):
    with pytest.raises(bigmodel.UnsafeCheckpointError, match="trusted=True") as info:
        bigmodel.dcp_to_hf(dcp_folder, tmp_path / "hf")
    assert ".metadata" in str(info.value)
    assert not (tmp_path / "hf").exists()


def test_dcp_inputs_that_are_not_usable_are_explained(dcp_folder, tmp_path):
    with pytest.raises(bigmodel.CheckpointNotFoundError, match=re.escape("no .metadata")):
        bigmodel.dcp_to_hf(tmp_path, tmp_path / "hf", trusted=True)
    with pytest.raises(bigmodel.CheckpointNotFoundError, match=re.escape("prefix='model.'")):
        bigmodel.dcp_to_hf(dcp_folder, tmp_path / "hf", trusted=True, prefix="optim.")


def test_the_non_tensor_entries_of_a_training_checkpoint_are_skipped(dcp_folder, tmp_path):
    result = bigmodel.dcp_to_hf(dcp_folder, tmp_path / "hf", trusted=True)
    with bigmodel.open_checkpoint(result.directory) as ckpt:
        assert sorted(ckpt.keys()) == sorted("model." + k for k in _training_state()["model"])


MEMORY_PROBE = """
import sys, torch, warnings
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
# what dcp_to_hf imports lazily, imported before measuring: the import alone is tens of MiB
import torch.distributed.checkpoint.filesystem, torch.distributed.checkpoint.metadata
import bigmodel
from bigmodel.foundations.memory import MemorySampler
folder = sys.argv[1]
with MemorySampler() as mem:
    bigmodel.dcp_to_hf(folder + "/dcp", folder + "/hf", trusted=True, max_shard_size="16MiB")
print(mem.increase("anon"))
"""


def test_converting_a_dcp_folder_holds_one_output_shard_at_a_time(tmp_path):
    import subprocess
    import sys

    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    # the DCP folder is written here; only the measured conversion needs a fresh process
    state = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(32)}  # 4 MiB each
    state_dict_saver.save(
        state, storage_writer=FileSystemWriter(str(tmp_path / "dcp")), no_dist=True
    )
    del state
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    anon = int(out.stdout.strip().splitlines()[-1])
    # the model is 128 MiB; one 16 MiB shard, the tensor being read, and allocator slack
    assert anon < 16 * 2**20 + 2 * 4 * 2**20 + 24 * 2**20, anon / 2**20
    with bigmodel.open_checkpoint(tmp_path / "hf") as ckpt:
        assert len(ckpt.files) == 8 and float(ckpt.get_tensor("w31")[0, 0]) == 31.0
