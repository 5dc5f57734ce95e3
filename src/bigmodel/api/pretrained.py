"""``from_pretrained`` for any module, and a mixin giving a model ``save_pretrained``/``from_pretrained``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from bigmodel.api.load import load_checkpoint
from bigmodel.api.save import save_checkpoint
from bigmodel.checkpoint.handle import Checkpoint
from bigmodel.checkpoint.index import MAX_INDEX_SIZE
from bigmodel.checkpoint.naming import HF_LAYOUT
from bigmodel.foundations.errors import BigModelError, InvalidCheckpointError
from bigmodel.foundations.types import SaveResult
from bigmodel.placement.empty import init_empty_weights
from bigmodel.storage.commit import Commit
from bigmodel.storage.files import read_bounded

__all__ = ["CONFIG_NAME", "PretrainedMixin", "from_pretrained"]

CONFIG_NAME = "config.json"
M = TypeVar("M", bound=nn.Module)


def from_pretrained(
    model_factory: Callable[[], M],
    checkpoint: str | os.PathLike[str] | Checkpoint,
    **load_options: Any,
) -> M:
    """Build ``model_factory()`` without weights, then load ``checkpoint`` into it.

    ``model_factory`` is anything that returns a module: a class, a lambda,
    ``lambda: AutoModelForCausalLM.from_config(config)``. It runs under
    :func:`bigmodel.init_empty_weights` (no memory, no random init); ``load_options`` go to
    :func:`bigmodel.load_checkpoint`. The model is returned in eval mode, as transformers does.
    """
    with init_empty_weights():
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory returned {type(model).__name__}, not an nn.Module.")
    load_checkpoint(model, checkpoint, **load_options)
    return model.eval()


def _config_to_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        if isinstance(result, Mapping):
            return dict(result)
    raise TypeError(
        f"Cannot save a config of type {type(config).__name__}: use a dataclass, a dict, or an object with to_dict()."
    )


class PretrainedMixin:
    """Give an ``nn.Module`` subclass ``save_pretrained`` and ``from_pretrained``.

    The model keeps its configuration in ``self.config`` (a dataclass, a dict, or an object with
    ``to_dict()``) and takes it as the only argument of its constructor. Set ``config_class``
    to rebuild a typed config from ``config.json`` (called with the saved keys as keyword
    arguments, or through its ``from_dict`` if it has one); without it the dict is passed.

    >>> class Net(PretrainedMixin, nn.Module):
    ...     config_class = NetConfig
    ...     def __init__(self, config): ...
    >>> net.save_pretrained("out/", max_shard_size="2GB")
    >>> Net.from_pretrained("out/", dtype=torch.bfloat16)
    """

    config_class: Any = None

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
        **save_options: Any,
    ) -> SaveResult:
        """Save the weights (see :func:`bigmodel.save_checkpoint`) and ``config.json`` beside them."""
        if not isinstance(self, nn.Module):
            raise TypeError("PretrainedMixin must be mixed into an nn.Module subclass.")
        config = getattr(self, "config", None)
        result = save_checkpoint(
            self,
            save_directory,
            max_shard_size=max_shard_size,
            safe_serialization=safe_serialization,
            **save_options,
        )
        if config is not None:
            data = (
                json.dumps(_config_to_dict(config), indent=2, sort_keys=True).encode("utf-8")
                + b"\n"
            )
            commit = Commit(
                Path(save_directory),
                layout=HF_LAYOUT,
                durable=save_options.get("durable", True),
            )
            try:
                commit.stage_bytes(CONFIG_NAME, data)
                commit.publish(None, replaces_checkpoint=False)
            except BaseException:
                commit.abort()
                raise
        return result

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike[str], **load_options: Any) -> M:  # type: ignore[misc]
        """Rebuild the config from ``config.json``, build on ``meta``, load the weights."""
        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        if os.path.lexists(config_path):  # a config.json of any kind is read (or refused)
            data = read_bounded(
                config_path,
                MAX_INDEX_SIZE,
                code="config-too-large",
                what="config.json",
                hint="re-save the model with save_pretrained.",
            )
            try:
                raw = json.loads(data.decode("utf-8"))
            except ValueError as exc:
                raise InvalidCheckpointError.one(
                    str(config_path),
                    "config-not-json",
                    f"config.json is not valid JSON ({exc}).",
                    hint="re-save the model with save_pretrained.",
                ) from None
            config_class = getattr(cls, "config_class", None)
            if config_class is None:
                config: Any = raw
            elif callable(getattr(config_class, "from_dict", None)):
                config = config_class.from_dict(raw)
            else:
                try:
                    config = config_class(**raw)
                except TypeError as exc:
                    raise BigModelError(
                        f"{config_path} does not fit {config_class.__name__}: {exc}. Fix: save and load with the same config class."
                    ) from None
            return from_pretrained(lambda: cls(config), folder, **load_options)
        return from_pretrained(cls, folder, **load_options)
