"""The fixtures of the tests that read a checkpoint over HTTP, written once: ``saved`` (a model
saved under ``<root>/ckpt``) and ``server`` (tests/_remote_servers.py's threaded HTTP server
serving ``<root>``).

A test module imports the fixtures it uses,
``from _remote_fixtures import saved_fixture, server_fixture  # noqa: F401``: pytest finds them
under their fixture names (``name=``), which no import then shadows. A module that saves
another model defines its own ``saved`` with ``save_served``; the shared ``server`` then
serves that one, since pytest resolves a fixture's arguments in the requesting module first.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import bigmodel
from _models import TinyNet
from _remote_servers import HttpServer, http_server


def save_served(
    root: Path, build: Callable[[], nn.Module] = TinyNet, max_shard_size: int = 2500
) -> tuple[nn.Module, Path]:
    """``build()`` under seed 0, saved in ``max_shard_size`` shards under ``root/ckpt``:
    (the model, ``root``), what a ``saved`` fixture returns and ``server`` serves."""
    torch.manual_seed(0)
    model = build()
    bigmodel.save_checkpoint(model, root / "ckpt", max_shard_size=max_shard_size)
    return model, root


@pytest.fixture(name="saved")
def saved_fixture(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A TinyNet saved in 2500-byte shards (a sharded checkpoint), as ``save_served`` gives."""
    return save_served(tmp_path)


@pytest.fixture(name="server")
def server_fixture(saved: tuple[nn.Module, Path]) -> Iterator[HttpServer]:
    """The HTTP server serving the ``saved`` root (its checkpoint is at ``server.url("ckpt")``)."""
    with http_server(saved[1]) as srv:
        yield srv
