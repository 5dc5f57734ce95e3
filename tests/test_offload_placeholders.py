"""An offloaded tensor used outside the forward of its unit raises a clear error naming it:
in torch 2.13 a ``meta`` weight mixed with a CPU input does not raise but returns uninitialised
memory, so a plain ``meta`` placeholder would give silently wrong outputs."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import bigmodel
from bigmodel.execution.placeholders import OffloadedPlaceholder, make_placeholder

WIDTH, VOCAB, LAYERS = 16, 40, 3


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)
        self.o = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class Net(nn.Module):
    """Blocks, and a head that computes ``hidden @ self.embed.weight.T``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x @ self.embed.weight.T


IDS = torch.tensor([[1, 5, 7, 2, 39]])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    bigmodel.save_checkpoint(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _load(folder, device_map) -> Net:
    with bigmodel.init_empty_weights():
        model = Net().eval()
    bigmodel.load_checkpoint(model, folder, device_map=device_map)
    return model


def test_torch_computes_garbage_from_a_plain_meta_weight_so_placeholders_must_refuse():
    out = F.linear(torch.randn(1, 10), torch.empty(10, 10, device="meta"))
    assert out.device.type == "cpu"  # no error from torch: the reason for this module


def test_a_submodule_called_directly_outside_its_unit_raises_naming_the_tensor_and_unit(saved):
    reference, folder = saved
    model = _load(folder, {"": "disk"})
    x = torch.randn(1, 5, WIDTH)
    with pytest.raises(bigmodel.MetaTensorError) as caught, torch.no_grad():
        model.layers[1].attn(x)
    message = str(caught.value)
    assert "'layers.1.attn.q.weight'" in message and "'layers.1'" in message
    assert "[offloaded-outside-unit]" in message and caught.value.code == "offloaded-outside-unit"
    with torch.no_grad():  # calling the unit's module itself works, and the model still runs
        assert torch.equal(model.layers[1](x), reference.layers[1](x))
        assert torch.equal(model(IDS), reference(IDS))


def test_a_module_reading_the_weight_of_another_unit_it_does_not_call_raises(saved):
    reference, folder = saved
    model = _load(folder, {"": "cpu", "embed": "disk"})
    with (
        torch.no_grad(),
        pytest.raises(bigmodel.MetaTensorError, match=r"'embed\.weight'.*'embed'"),
    ):
        model(IDS)
    with torch.no_grad():  # one entry for both: the head finds the embedding in place
        assert torch.equal(_load(folder, {"": "disk"})(IDS), reference(IDS))


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"embed": "cpu", "layers": "disk"}])
def test_offloaded_runs_stay_bit_exact_and_placeholders_come_back_after(saved, device_map):
    reference, folder = saved
    model = _load(folder, device_map)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(IDS), reference(IDS))
    weight = model.layers[0].attn.q.weight
    assert isinstance(weight, OffloadedPlaceholder) and isinstance(weight, nn.Parameter)
    assert weight._bigmodel_name == "layers.0.attn.q.weight"
    assert weight._bigmodel_scope == "layers.0"


def test_a_placeholder_answers_metadata_questions_and_walks_like_a_meta_parameter():
    p = make_placeholder(torch.empty(4, 3), "lin.weight", "lin", is_parameter=True, grad=True)
    assert p.shape == (4, 3) and p.dtype == torch.float32 and p.device.type == "meta"
    assert p.requires_grad and p.is_floating_point()
    assert (p.numel(), p.element_size(), p.dim(), p.size(0)) == (12, 4, 2, 4)
    assert "meta" in repr(p)
    assert torch.empty_like(p, device="cpu").shape == (4, 3)
    assert p.new_zeros(2).is_meta
    for derived in (p.detach(), p.T, p.to("meta"), p.to(torch.bfloat16), copy.deepcopy(p)):
        assert derived.is_meta and isinstance(derived, OffloadedPlaceholder)
        assert derived._bigmodel_name == "lin.weight"
    lin = nn.Linear(3, 4)
    lin._parameters["weight"] = p
    assert lin.state_dict()["weight"].is_meta
    assert dict(lin.named_parameters())["weight"] is p
    # accelerate's set_module_tensor_to_device rebuilds a parameter through type(param)
    assert type(type(p)(torch.ones(2), requires_grad=False)) is nn.Parameter


@pytest.mark.parametrize(
    "compute",
    [
        lambda p: F.linear(torch.randn(1, 3), p),
        lambda p: torch.randn(2, 4) @ p,
        lambda p: torch.randn(3, 4).add_(p.T),
        lambda p: F.embedding(torch.tensor([1]), p),
        lambda p: p.to("cpu"),
        lambda p: p.detach().T @ torch.randn(4, 1),
        lambda p: torch.cat([p, torch.randn(1, 3)]),
        lambda p: p.sum().item(),
    ],
    ids=["linear", "matmul", "in-place", "embedding", "copy-out", "view", "list-argument", "item"],
)
def test_every_computation_with_real_data_raises_naming_the_tensor(compute):
    p = make_placeholder(torch.empty(4, 3), "lin.weight", "", is_parameter=True)
    with pytest.raises(bigmodel.MetaTensorError, match=r"'lin\.weight'.*the root module"):
        compute(p)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    ids = torch.tensor([[3, 17, 5, 42, 9]])
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    return transformers.LlamaForCausalLM, config, folder, ids, tokens


@pytest.mark.parametrize(
    "device_map",
    [{"": "disk"}, {"model.embed_tokens": "cpu", "model.layers": "disk", "": "cpu"}],
    ids=["whole-model-on-disk", "layers-on-disk"],
)
def test_transformers_llama_generates_the_in_memory_tokens_with_placeholders(llama, device_map):
    cls, config, folder, ids, tokens = llama
    with bigmodel.init_empty_weights():
        model = cls(config).eval()
    bigmodel.load_checkpoint(model, folder, device_map=device_map)
    assert isinstance(model.model.layers[1].mlp.up_proj.weight, OffloadedPlaceholder)
    assert model.dtype == torch.float32  # transformers reads it off the parameters
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), tokens)
