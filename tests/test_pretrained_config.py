"""``PretrainedMixin`` rebuilds a typed config without ``config_class``: from the ``__init__``
annotation, or from the class config.json records if the model's own module defines it. A
class that config.json names is never imported."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import pytest
import torch
from torch import nn

import bigmodel
from conftest import assert_same_state


@dataclasses.dataclass
class WidthConfig:
    width: int = 4
    depth: int = 1


class AnnotatedNet(bigmodel.PretrainedMixin, nn.Module):
    """No config_class: the annotation says what the config is."""

    def __init__(self, config: WidthConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            nn.Linear(config.width, config.width) for _ in range(config.depth)
        )


class OptionalNet(AnnotatedNet):
    def __init__(self, config: WidthConfig | None = None) -> None:
        super().__init__(config or WidthConfig())


class UnannotatedNet(bigmodel.PretrainedMixin, nn.Module):
    """No config_class, no annotation: the class recorded in config.json is used."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.width, 2)


class DictConfigNet(bigmodel.PretrainedMixin, nn.Module):
    def __init__(self, config: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config["width"], 2)


class FromDictConfig:
    def __init__(self, width: int) -> None:
        self.width = width

    def to_dict(self) -> dict[str, int]:
        return {"width": self.width}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FromDictConfig:
        return cls(raw["width"] * 1)


class FromDictNet(bigmodel.PretrainedMixin, nn.Module):
    def __init__(self, config: FromDictConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.width, 2)


def test_a_dataclass_config_round_trips_without_config_class(tmp_path):
    torch.manual_seed(0)
    net = AnnotatedNet(WidthConfig(width=6, depth=3))
    net.save_pretrained(tmp_path, max_shard_size=200)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {
        "width": 6,
        "depth": 3,
        "_bigmodel_config_class": f"{__name__}:WidthConfig",
    }
    loaded = AnnotatedNet.from_pretrained(tmp_path)
    assert loaded.config == WidthConfig(width=6, depth=3)
    assert_same_state(loaded.state_dict(), net.state_dict())


@pytest.mark.parametrize("model_class", [AnnotatedNet, OptionalNet])
def test_the_init_annotation_types_a_config_json_that_records_no_class(tmp_path, model_class):
    net = model_class(WidthConfig(width=5, depth=2))
    net.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 5, "depth": 2}))
    loaded = model_class.from_pretrained(tmp_path)
    assert loaded.config == WidthConfig(width=5, depth=2)
    assert_same_state(loaded.state_dict(), net.state_dict())


def test_a_class_with_from_dict_is_rebuilt_through_it(tmp_path):
    net = FromDictNet(FromDictConfig(width=7))
    net.save_pretrained(tmp_path)
    loaded = FromDictNet.from_pretrained(tmp_path)
    assert isinstance(loaded.config, FromDictConfig) and loaded.config.width == 7


def test_an_unannotated_model_uses_the_class_recorded_from_its_own_module(tmp_path):
    net = UnannotatedNet(WidthConfig(width=3))
    net.save_pretrained(tmp_path)
    loaded = UnannotatedNet.from_pretrained(tmp_path)
    assert loaded.config == WidthConfig(width=3)
    assert_same_state(loaded.state_dict(), net.state_dict())


def test_a_dict_config_still_round_trips_as_a_dict_and_records_no_class(tmp_path):
    net = DictConfigNet({"width": 5})
    net.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"width": 5}
    loaded = DictConfigNet.from_pretrained(tmp_path)
    assert loaded.config == {"width": 5}


def test_a_config_json_naming_a_module_never_imports_it(tmp_path, monkeypatch, caplog):
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported"
    (code / "planted_config_module.py").write_text(
        "import dataclasses, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "@dataclasses.dataclass\nclass WidthConfig:\n    width: int = 4\n"
    )
    monkeypatch.syspath_prepend(str(code))
    folder = tmp_path / "model"
    DictConfigNet({"width": 5}).save_pretrained(folder)
    raw = {"width": 5, "_bigmodel_config_class": "planted_config_module:WidthConfig"}
    (folder / "config.json").write_text(json.dumps(raw))

    with caplog.at_level(logging.WARNING, logger="bigmodel"):
        loaded = DictConfigNet.from_pretrained(folder)
    assert loaded.config == {"width": 5}
    assert "planted_config_module" not in sys.modules
    assert not marker.exists()
    assert "ignoring _bigmodel_config_class" in caplog.text


@pytest.mark.parametrize(
    "recorded",
    [
        "bigmodel.foundations.types:SaveResult",  # a dataclass, already imported, elsewhere
        "subprocess:Popen",
        f"{__name__}:UnannotatedNet",  # in the model's module, but not a config class
        f"{__name__}:json",  # not a class
        f"{__name__}:WidthConfig.__init__",
        f"{__name__}:",
        "no colon",
    ],
)
def test_a_recorded_class_outside_the_model_module_or_not_a_config_is_never_called(
    tmp_path, recorded
):
    UnannotatedNet(WidthConfig(width=3)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"width": 3, "_bigmodel_config_class": recorded})
    )
    with pytest.raises(AttributeError, match="'dict' object has no attribute 'width'"):
        UnannotatedNet.from_pretrained(tmp_path)  # the dict is passed, nothing else is built


def test_config_class_still_wins_over_the_annotation_and_the_record(tmp_path):
    @dataclasses.dataclass
    class Other:
        width: int
        depth: int

    class Explicit(AnnotatedNet):
        config_class = Other

    net = Explicit(WidthConfig(width=4, depth=1))
    net.save_pretrained(tmp_path)
    assert isinstance(Explicit.from_pretrained(tmp_path).config, Other)
