"""``from_pretrained`` for any module, and a mixin giving a model ``save_pretrained``/``from_pretrained``."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from bigmodel.api.load import load_checkpoint
from bigmodel.api.save import save_checkpoint
from bigmodel.checkpoint.handle import Checkpoint, read_config
from bigmodel.checkpoint.index import MAX_INDEX_SIZE
from bigmodel.checkpoint.naming import CONFIG_NAME, HF_LAYOUT
from bigmodel.foundations.errors import BigModelError, InvalidCheckpointError
from bigmodel.foundations.log import logger
from bigmodel.foundations.types import RemoteOptions, SaveResult
from bigmodel.placement.empty import init_empty_weights
from bigmodel.storage.commit import Commit
from bigmodel.storage.remote import RemoteFolder, is_remote

__all__ = ["CONFIG_CLASS_KEY", "CONFIG_NAME", "PretrainedMixin", "from_pretrained"]

#: Key of config.json recording the config's class as ``"module:QualName"`` (a hint only: see
#: :func:`_recorded_class`; it never makes bigmodel import anything).
CONFIG_CLASS_KEY = "_bigmodel_config_class"
M = TypeVar("M", bound=nn.Module)


def from_pretrained(
    model_factory: Callable[[], M],
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    remote: RemoteOptions | None = None,
    **load_options: Any,
) -> M:
    """Build ``model_factory()`` without weights, then load ``checkpoint`` into it.

    ``model_factory`` is anything that returns a module: a class, a lambda,
    ``lambda: AutoModelForCausalLM.from_config(config)``. It runs under
    :func:`bigmodel.init_empty_weights` (no memory, no random init); ``load_options`` go to
    :func:`bigmodel.load_checkpoint`. The model is returned in eval mode, as transformers does,
    and, as transformers does, has ``hf_device_map`` only when its ``device_map`` spans more
    than one device or uses disk. ``checkpoint`` may be a URL (``https://``, ``s3://``...);
    ``remote`` (:class:`~bigmodel.RemoteOptions`) sets how it is read.
    """
    with init_empty_weights():
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory returned {type(model).__name__}, not an nn.Module.")
    load_checkpoint(model, checkpoint, remote=remote, **load_options)
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) == 1 and "disk" not in devices:
        del model.hf_device_map  # transformers dispatches (and sets it) for several devices only
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


def _config_json(config: Any) -> bytes:
    """config.json: the config's fields, and its class unless it is a dict (or a local class)."""
    data = _config_to_dict(config)
    kind = type(config)
    if not isinstance(config, Mapping) and "<locals>" not in kind.__qualname__:
        data[CONFIG_CLASS_KEY] = f"{kind.__module__}:{kind.__qualname__}"
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _is_config_class(obj: object) -> bool:
    """A class that can be rebuilt from config.json: a dataclass, or one with ``from_dict``."""
    return isinstance(obj, type) and (
        dataclasses.is_dataclass(obj) or callable(getattr(obj, "from_dict", None))
    )


def _annotated_class(model_class: type) -> type | None:
    """The config class the model's ``__init__`` annotates its ``config`` parameter with (or
    its first parameter's, without one named ``config``); ``X | None`` counts as ``X``. None
    when there is no annotation, it cannot be resolved, or it is not a config class (a dict)."""
    init = model_class.__init__  # type: ignore[misc]
    try:
        params = list(inspect.signature(init).parameters)[1:]
        hints = typing.get_type_hints(init)
    except (AttributeError, NameError, SyntaxError, TypeError, ValueError):  # unresolvable
        return None
    name = "config" if "config" in params else (params[0] if params else None)
    hint = hints.get(name) if name else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else None
    return hint if _is_config_class(hint) else None


def _recorded_class(model_class: type, recorded: object, path: str) -> type | None:
    """The class config.json records, only if the model's own (already imported) module
    defines it and it is a config class. Nothing is imported: a file naming any other class
    (say ``os:system``, or a module with side effects) is ignored with a warning."""
    if recorded is None:
        return None
    module_name, _, qualname = str(recorded).partition(":")
    found: object = None
    module = sys.modules.get(model_class.__module__)
    if module_name == model_class.__module__ and module is not None and qualname:
        found = module
        for part in qualname.split("."):  # plain __dict__ lookups: no __getattr__ hooks run
            found = vars(found).get(part) if isinstance(found, type | types.ModuleType) else None
    if _is_config_class(found) and getattr(found, "__qualname__", None) == qualname:
        return typing.cast(type, found)
    logger.warning(
        "%s: ignoring %s=%r: only a dataclass (or a class with from_dict) defined in the "
        "model's module %s is used; set %s.config_class to choose the config class",
        path,
        CONFIG_CLASS_KEY,
        recorded,
        model_class.__module__,
        model_class.__name__,
    )
    return None


def _build_config(config_class: Any, raw: dict[str, Any], path: str) -> Any:
    """``config_class.from_dict(raw)`` if it has one, else ``config_class(**raw)``."""
    if callable(getattr(config_class, "from_dict", None)):
        return config_class.from_dict(raw)
    try:
        return config_class(**raw)
    except TypeError as exc:
        raise BigModelError(
            f"{path} does not fit {config_class.__name__}: {exc}. Fix: save and load with the same config class."
        ) from None


_CONFIG_HINT = "re-save the model with save_pretrained."


def _config_bytes(
    directory: str | os.PathLike[str], remote: RemoteOptions | None
) -> tuple[bytes, str] | None:
    """``(bytes, where)`` of the ``config.json`` beside a checkpoint — a local folder or a URL
    prefix — read bounded by ``MAX_INDEX_SIZE``; None when there is none."""
    if not is_remote(directory):
        local = Path(directory)
        data = read_config(local, limit=MAX_INDEX_SIZE, hint=_CONFIG_HINT)
        return None if data is None else (data, str(local / CONFIG_NAME))
    folder = RemoteFolder(str(directory), remote)
    try:
        data = read_config(folder, limit=MAX_INDEX_SIZE, hint=_CONFIG_HINT)
        return None if data is None else (data, str(folder.path(CONFIG_NAME)))
    finally:
        folder.close()


def _parse_config_json(data: bytes, where: str) -> Any:
    """The parsed config.json (invalid JSON is an InvalidCheckpointError naming ``where``)."""
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise InvalidCheckpointError.one(
            where, "config-not-json", f"config.json is not valid JSON ({exc}).", hint=_CONFIG_HINT
        ) from None


def _load_config(model_class: type, data: bytes, path: str) -> Any:
    """The model's config from config.json (``data``, read from ``path``), typed by the first
    of: ``config_class``, the ``__init__`` annotation, the class config.json records (see
    :func:`_recorded_class`); with none of them, the dict itself."""
    raw = _parse_config_json(data, path)
    recorded = raw.pop(CONFIG_CLASS_KEY, None) if isinstance(raw, dict) else None
    config_class = getattr(model_class, "config_class", None) or _annotated_class(model_class)
    if config_class is None:
        config_class = _recorded_class(model_class, recorded, path)
    return raw if config_class is None else _build_config(config_class, raw, path)


class PretrainedMixin:
    """Give an ``nn.Module`` subclass ``save_pretrained`` and ``from_pretrained``.

    The model keeps its configuration in ``self.config`` (a dataclass, a dict, or an object with
    ``to_dict()``) and takes it as the only argument of its constructor. ``save_pretrained``
    writes its fields to ``config.json``, with its class as ``"_bigmodel_config_class":
    "module:QualName"`` (not for a dict). ``from_pretrained`` rebuilds it (``from_dict(raw)``
    if the class has one, else ``Class(**raw)``) with the first class found: ``config_class``
    if set; the annotation of ``__init__``'s ``config`` parameter; the recorded class, only if
    it is a dataclass (or has ``from_dict``) defined in the model's own module (nothing is
    ever imported because config.json names it). With none, the dict is passed.

    >>> class Net(PretrainedMixin, nn.Module):
    ...     def __init__(self, config: NetConfig): ...
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
            background=False,  # config.json is written after the weights are durable
            **save_options,
        )
        if config is not None:
            data = _config_json(config)
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
        """Rebuild the config from ``config.json``, build on ``meta``, load the weights.
        ``directory`` is a folder or a URL prefix (``https://``, ``s3://``: see
        :func:`bigmodel.open_checkpoint`); ``load_options`` go to :func:`from_pretrained`
        (``remote=`` reads the config too)."""
        found = _config_bytes(directory, load_options.get("remote"))
        if found is not None:
            config = _load_config(cls, *found)
            return from_pretrained(lambda: cls(config), directory, **load_options)
        return from_pretrained(cls, directory, **load_options)
