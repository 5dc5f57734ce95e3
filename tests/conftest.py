import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# Property tests are derandomized by default so that CI is deterministic; run with
# HYPOTHESIS_PROFILE=explore to search new examples (failures are saved in .hypothesis/).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

os.environ.setdefault("BIGMODEL_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def spy_populators(monkeypatch) -> list[tuple[int, dict]]:
    """A list that gets, for every ``Populator`` started from now on, its number of tensors
    and the keyword arguments it was given (threads, piece size, bound)."""
    from bigmodel.storage.readahead import Populator

    started: list[tuple[int, dict]] = []
    real = Populator.__init__

    def spy(self, tensors, **kwargs):
        started.append((len(tensors), kwargs))
        real(self, tensors, **kwargs)

    monkeypatch.setattr(Populator, "__init__", spy)
    return started


def tiny_llama_config(*, tie: bool = True):
    """A Llama config small enough for unit tests (transformers is imported lazily)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


class TiedNet(nn.Module):
    """Embedding, two blocks, a head tied to the embedding, and a persistent buffer."""

    def __init__(self, vocab: int = 32, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.fixture
def tied_net() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes: compares NaNs and dtypes without arithmetic (float8 has no ==)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_bytes(a: bytes, b: bytes) -> bool:
    """Equality of two byte strings, as a plain bool.

    Never write ``assert big_bytes == other`` in a test: on failure pytest diffs the two reprs
    with difflib, which is quadratic and ran for minutes on 512 KB tensors in CI.
    """
    return a == b


def differing_keys(actual: dict, expected: dict) -> list[str]:
    """The keys whose dtype, shape or bytes differ (both dicts must have the same keys)."""
    return [
        key
        for key, want in expected.items()
        if actual[key].dtype != want.dtype
        or actual[key].shape != want.shape
        or not same_bytes(raw_bytes(actual[key]), raw_bytes(want))
    ]


def is_same_state(actual: dict, expected: dict) -> bool:
    return sorted(actual) == sorted(expected) and not differing_keys(actual, expected)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    differing = differing_keys(actual, expected)
    assert not differing, f"dtype, shape or bytes differ for {differing}"
