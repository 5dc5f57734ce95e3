import pytest
import torch

import bigmodel
from conftest import assert_same_state


@pytest.fixture
def sharded(tmp_path):
    state = {
        "a.weight": torch.arange(60, dtype=torch.float32).reshape(6, 10),
        "b.weight": torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        "c.flag": torch.tensor([True, False, True]),
        "d.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    bigmodel.save_checkpoint(state, tmp_path, max_shard_size=200)
    return tmp_path, state


def test_a_folder_an_index_file_and_a_shard_file_all_open(sharded):
    folder, state = sharded
    by_folder = bigmodel.open_checkpoint(folder)
    by_index = bigmodel.open_checkpoint(folder / "model.safetensors.index.json")
    assert by_folder.is_sharded and by_index.is_sharded
    assert by_folder.keys() == by_index.keys() == list(state)
    assert by_folder.files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]  # 240 alone, then 192+3+2
    assert by_folder.metadata["total_size"] == by_folder.total_size == 240 + 192 + 3 + 2
    one = bigmodel.open_checkpoint(folder / by_folder.files[0])
    assert not one.is_sharded
    assert one.keys() == ["a.weight"]
    assert one.metadata["format"] == "pt"
    assert (
        one.metadata["bigmodel_digest"]
        == by_folder.metadata["bigmodel_digests"][by_folder.files[0]]
    )


def test_tensor_info_describes_a_tensor_without_reading_it(sharded):
    folder, _ = sharded
    info = bigmodel.open_checkpoint(folder).tensor_info("b.weight")
    assert (info.dtype, info.shape, info.file, info.nbytes, info.alias_of) == (
        torch.int64,
        (2, 3, 4),
        "model-00002-of-00002.safetensors",
        192,
        None,
    )


def test_get_tensor_returns_every_tensor_and_names_an_unknown_key(sharded):
    folder, state = sharded
    ckpt = bigmodel.open_checkpoint(folder)
    assert_same_state({k: ckpt.get_tensor(k) for k in ckpt}, state)
    assert "a.weight" in ckpt and "nope" not in ckpt and len(ckpt) == 4
    with pytest.raises(KeyError, match="'nope' is not a tensor of the checkpoint"):
        ckpt.get_tensor("nope")


def test_get_slice_reads_the_requested_rows_and_columns(sharded):
    folder, state = sharded
    ckpt = bigmodel.open_checkpoint(folder)
    sl = ckpt.get_slice("a.weight")
    assert sl.get_shape() == [6, 10] and sl.dtype == torch.float32
    assert torch.equal(sl[1:3], state["a.weight"][1:3])
    assert torch.equal(sl[:, 2:5], state["a.weight"][:, 2:5])
    assert sl[:, 2:5].is_contiguous()
    assert torch.equal(sl[4], state["a.weight"][4])
    assert torch.equal(ckpt.get_slice("b.weight")[..., 1], state["b.weight"][..., 1])


def test_tensors_are_zero_copy_views_and_writing_to_them_never_changes_the_file(sharded):
    folder, state = sharded
    ckpt = bigmodel.open_checkpoint(folder)
    first, second = ckpt.get_tensor("a.weight"), ckpt.get_tensor("a.weight")
    assert first.data_ptr() == second.data_ptr()  # both views of the same mapping
    first.fill_(-1)
    assert torch.equal(bigmodel.open_checkpoint(folder).get_tensor("a.weight"), state["a.weight"])


def test_a_bin_checkpoint_opens_through_weights_only_mmap(tmp_path):
    state = {"w": torch.randn(4, 4), "i": torch.arange(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = bigmodel.open_checkpoint(tmp_path)
    assert ckpt.format == "bin"
    assert_same_state({k: ckpt.get_tensor(k) for k in ckpt}, state)
    assert torch.equal(ckpt.get_slice("w")[1:2], state["w"][1:2])
