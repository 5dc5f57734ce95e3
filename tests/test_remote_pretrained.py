"""``PretrainedMixin.from_pretrained`` reads ``config.json`` and the weights from a URL, with the
same bounds and errors as a local folder (a real threaded HTTP server, tests/_remote_servers.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import bigmodel
from _remote_servers import http_server
from bigmodel import InvalidCheckpointError

pytest.importorskip(
    "obstore", reason="the optional remote client is not installed: pip install 'bigmodel[remote]'"
)


@dataclass
class NetConfig:
    width: int = 8
    depth: int = 2


class Net(bigmodel.PretrainedMixin, nn.Module):
    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            nn.Linear(config.width, config.width) for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_pretrained_mixin_model_is_rebuilt_from_a_url_config_and_weights(tmp_path):
    torch.manual_seed(0)
    net = Net(NetConfig(width=12, depth=3))
    net.save_pretrained(tmp_path / "ckpt")
    with http_server(tmp_path) as server:
        loaded = Net.from_pretrained(server.url("ckpt"))
        fetched = server.faults.paths("GET")
    assert any(p.endswith("/config.json") for p in fetched)  # the config came over HTTP
    assert any(p.endswith(".safetensors") for p in fetched)  # and the weights
    assert loaded.config == NetConfig(width=12, depth=3)
    x = torch.randn(2, 12)
    assert torch.equal(loaded(x), net(x))


def test_a_url_config_that_is_not_json_is_refused_naming_the_url(tmp_path):
    Net(NetConfig()).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with (
        http_server(tmp_path) as server,
        pytest.raises(InvalidCheckpointError, match=r"config-not-json") as caught,
    ):
        Net.from_pretrained(server.url("ckpt"))
    assert "config.json" in str(caught.value) and "http://" in str(caught.value)
