"""``CheckpointManager``: numbered training checkpoints in one root, saved in the background.

Layout of ``root/step-<n>/`` (``n`` in decimal, no padding):

* the model in the Hugging Face layout (``model.safetensors`` or shards and an index, plus
  ``config.json`` for a model with a ``config``): transformers and bigmodel load the folder
  as it is;
* ``optimizer.safetensors`` and ``optimizer.json``: the optimizer state keyed by parameter
  names (see :mod:`bigmodel.api.optimizer_state`);
* ``extra.json``: the caller's small JSON extras;
* ``bigmodel-checkpoint.json``: the *completion marker*, written last (temporary name,
  fsync, rename, folder fsync) and listing every file with its size.

A step is **complete** when its marker parses, names the step of its folder, and every file
it lists exists with the listed size. :meth:`CheckpointManager.latest` is the largest
complete step; anything else in ``root`` (half-written steps, other files, odd names,
symlinks) is ignored. A save of step ``n`` first removes ``n``'s old marker, so a folder is
never complete with mixed contents. Old steps are deleted (``keep_last``) only after the new
marker is durable: each is renamed to a hidden ``.step-<n>.bigmodel-deleting-*`` name (atomic)
and then removed, so a kill -9 at any moment leaves ``latest()`` on a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.api.load import load_sharded_checkpoint
from bigmodel.api.optimizer_state import load_named_optimizer_state, named_optimizer_state
from bigmodel.api.save import PlannedSave, _save_workers, _state_dict, plan_state
from bigmodel.checkpoint.naming import CONFIG_NAME, HF_LAYOUT
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.execution.background import SaveHandle, submit
from bigmodel.execution.writing import WriteOptions
from bigmodel.foundations import strict_json
from bigmodel.foundations.errors import BigModelError, CheckpointNotFoundError
from bigmodel.foundations.types import SaveResult
from bigmodel.foundations.units import parse_size
from bigmodel.storage.atomic import fsync_dir, new_token
from bigmodel.storage.commit import Commit
from bigmodel.storage.digest import DEFAULT_ALGORITHM
from bigmodel.storage.files import read_bounded
from bigmodel.storage.safetensors import write_safetensors

__all__ = ["MARKER_NAME", "CheckpointManager"]

MARKER_NAME = "bigmodel-checkpoint.json"
MARKER_FORMAT = "bigmodel-checkpoint/1"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
EXTRA_JSON = "extra.json"
_STEP_RE = re.compile(r"^step-(0|[1-9][0-9]{0,17})$")
_TRASH = ".bigmodel-deleting-"
_MARKER_LIMIT = 1 << 20
_OPT_PREFIX = "optimizer::"


@dataclass(frozen=True)
class _Side:
    """What a step holds beside the model, snapshotted at the call."""

    optimizer_json: bytes | None
    extra_json: bytes | None
    config_json: bytes | None


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, indent=2, allow_nan=False).encode("utf-8") + b"\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} cannot be saved as JSON: {exc}. Fix: pass numbers, strings, booleans, "
            "None, lists and dicts (convert tensors with .tolist())."
        ) from exc


def _config_bytes(model: nn.Module) -> bytes | None:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if callable(to_json):  # a transformers config: what save_pretrained writes
        return str(to_json()).encode("utf-8")
    return None


class CheckpointManager:
    """Numbered checkpoints of a training run under ``root``; see the module docstring.

    ``keep_last`` (None: keep all) complete steps are kept; older ones are deleted once a
    newer one is durable. ``max_shard_size``, ``durable``, ``digest`` and
    ``staging_memory`` are passed to the model's save (:func:`bigmodel.save_checkpoint`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int | None = None,
        *,
        max_shard_size: int | str = "10GB",
        durable: bool = True,
        digest: str | None = DEFAULT_ALGORITHM,
        staging_memory: int | str | None = None,
        workers: int | None = None,
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r}: keep at least one step (or None for all).")
        self.root = Path(root)
        self.keep_last = keep_last
        self._limit = parse_size(max_shard_size)
        self._opts = WriteOptions(durable=durable, digest=digest, progress=False)
        self._staging = None if staging_memory is None else parse_size(staging_memory)
        self._workers = _save_workers(workers)

    def path(self, step: int) -> Path:
        """The folder of ``step``."""
        return self.root / f"step-{_check_step(step)}"

    # -- saving ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Any = None,
        background: bool = True,
    ) -> SaveHandle[SaveResult]:
        """Save ``model`` (and ``optimizer``, ``extra``) as ``step``; returns a handle.

        With ``background=True`` the call returns once the tensors are staged (change them
        freely from then on); the handle's ``wait()`` gives the model's
        :class:`~bigmodel.SaveResult` once the step is complete and older steps are rotated.
        With ``background=False`` the call returns a handle that is already done.
        """
        folder = self.path(step)
        planned = plan_state(_state_dict(model, safe=True, cast=None), self._limit, self._opts)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json = None
        if optimizer is not None:
            opt_tensors, document = named_optimizer_state(model, optimizer)
            opt_json = _json_bytes(document, "the optimizer state")
        side = _Side(
            opt_json,
            None if extra is None else _json_bytes(extra, "extra"),
            _config_bytes(model),
        )
        tensors = {**planned.stored, **{_OPT_PREFIX + k: v for k, v in opt_tensors.items()}}

        def job(staged: Mapping[str, torch.Tensor]) -> SaveResult:
            return self._write_step(step, folder, planned, staged, side)

        if not background:
            return SaveHandle.completed(folder, job(tensors))
        return submit(folder, tensors, job, staging_memory=self._staging)

    def _write_step(
        self,
        step: int,
        folder: Path,
        planned: PlannedSave,
        staged: Mapping[str, torch.Tensor],
        side: _Side,
    ) -> SaveResult:
        """The worker's part: model, side files, marker, then rotation."""
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if created and self._opts.durable:
            fsync_dir(self.root)
        with contextlib.suppress(FileNotFoundError):
            (folder / MARKER_NAME).unlink()  # never complete while it is being rewritten
            if self._opts.durable:
                fsync_dir(folder)
        result = planned.write(folder, staged, self._workers)
        opt = {
            k.removeprefix(_OPT_PREFIX): v for k, v in staged.items() if k.startswith(_OPT_PREFIX)
        }
        written = self._write_side_files(folder, side, opt)
        files = [*result.files, *([result.index_file] if result.index_file else []), *written]
        marker = {
            "format": MARKER_FORMAT,
            "step": step,
            "files": {name: (folder / name).stat().st_size for name in files},
            "optimizer": side.optimizer_json is not None,
            "extra": side.extra_json is not None,
        }
        self._publish(folder, {MARKER_NAME: _json_bytes(marker, "the marker")})
        self._rotate(step)
        return result

    def _write_side_files(
        self, folder: Path, side: _Side, opt_tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        files: dict[str, bytes] = {}
        if side.optimizer_json is not None:
            files[OPTIMIZER_JSON] = side.optimizer_json
        if side.extra_json is not None:
            files[EXTRA_JSON] = side.extra_json
        if side.config_json is not None:
            files[CONFIG_NAME] = side.config_json
        tensors = opt_tensors if side.optimizer_json is not None else None
        self._publish(folder, files, tensors)
        return sorted(files) + ([OPTIMIZER_TENSORS] if tensors is not None else [])

    def _publish(
        self,
        folder: Path,
        files: Mapping[str, bytes],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write side files under temporary names, fsync, rename into place (no weights removed)."""
        commit = Commit(folder, layout=HF_LAYOUT, durable=self._opts.durable)
        try:
            if tensors is not None:
                items = sorted(tensors.items())
                commit.stage(
                    OPTIMIZER_TENSORS,
                    lambda fh: write_safetensors(fh, items, {}, digest=self._opts.digest),
                )
            for name, data in files.items():
                commit.stage_bytes(name, data)
            commit.publish(None, replaces_checkpoint=False)
        except BaseException:
            commit.abort()
            raise

    # -- rotation ----------------------------------------------------------------------------
    def _rotate(self, newest: int) -> None:
        """Delete old steps once ``newest`` is durable; leftovers of killed deletions too."""
        for name in _listdir(self.root):
            if name.startswith(".step-") and _TRASH in name:
                shutil.rmtree(self.root / name, ignore_errors=True)
        if self.keep_last is None:
            return
        complete = self.steps()
        kept = set(complete[-self.keep_last :]) | {newest}
        oldest_kept = min(kept)
        for name in _listdir(self.root):
            match = _STEP_RE.match(name)
            if match is None or int(match.group(1)) in kept:
                continue
            if int(match.group(1)) < oldest_kept and self._is_dir(name):
                self._delete(name)

    def _delete(self, name: str) -> None:
        trash = self.root / f".{name}{_TRASH}{new_token()}"
        try:
            os.rename(self.root / name, trash)
        except OSError:
            return
        if self._opts.durable:
            fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.root / name).st_mode)
        except OSError:
            return False

    # -- reading -----------------------------------------------------------------------------
    def _marker(self, step: int) -> dict[str, Any] | None:
        """The marker of a complete ``step``; None for anything else (never raises)."""
        folder = self.path(step)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
            data = read_bounded(
                folder / MARKER_NAME, _MARKER_LIMIT, code="marker-too-large", what="marker", hint=""
            )
            marker = strict_json.loads(data.decode("utf-8"))
        except (OSError, ValueError, RecursionError, BigModelError):
            return None
        if not _valid_marker(marker, step, folder):
            return None
        assert isinstance(marker, dict)
        return marker

    def steps(self) -> list[int]:
        """Every complete step in ``root``, oldest first."""
        found = []
        for name in _listdir(self.root):
            match = _STEP_RE.match(name)
            if match is not None and self._marker(int(match.group(1))) is not None:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete step, or None when there is none."""
        complete = self.steps()
        return complete[-1] if complete else None

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int | None = None,
    ) -> tuple[int, Any]:
        """Load ``step`` (default: the latest) into ``model`` (and ``optimizer``) in place.

        Returns ``(step, extra)`` (``extra`` is None when the step saved none). Parameters
        are filled with ``copy_``, so an optimizer built on them keeps working.
        """
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(
                    f"No complete checkpoint in {self.root} (no step-<n> folder with a valid "
                    f"{MARKER_NAME}). Fix: save one first, or pass the root the run saved into."
                )
        marker = self._marker(step)
        folder = self.path(step)
        if marker is None:
            raise CheckpointNotFoundError(
                f"{folder} is not a complete checkpoint (missing or invalid {MARKER_NAME}: the save "
                f"was interrupted or the folder was changed). Fix: restore another step; complete "
                f"ones: {self.steps()}."
            )
        load_sharded_checkpoint(model, folder, strict=True, progress=False)
        if optimizer is not None:
            self._restore_optimizer(model, optimizer, folder, marker)
        extra = None
        if marker.get("extra"):
            extra = json.loads((folder / EXTRA_JSON).read_bytes())
        return step, extra

    def _restore_optimizer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        folder: Path,
        marker: dict[str, Any],
    ) -> None:
        if not marker.get("optimizer"):
            raise CheckpointNotFoundError(
                f"{folder} holds no optimizer state (it was saved without one). "
                "Fix: restore with optimizer=None, or restore a step saved with the optimizer."
            )
        document = json.loads((folder / OPTIMIZER_JSON).read_bytes())
        with open_checkpoint(folder / OPTIMIZER_TENSORS) as ckpt:
            tensors = {k: ckpt.get_tensor(k).clone() for k in ckpt.keys()}
        load_named_optimizer_state(
            model, optimizer, document, tensors, path=str(folder / OPTIMIZER_JSON)
        )


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or step >= 10**18:
        raise ValueError(f"step={step!r}: a step is an int from 0 to 10**18 - 1.")
    return step


def _listdir(root: Path) -> list[str]:
    try:
        return os.listdir(root)
    except OSError:
        return []


def _valid_marker(marker: object, step: int, folder: Path) -> bool:
    """The marker names this step and every file it lists is there with its size."""
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return False
    files = marker.get("files")
    if marker.get("step") != step or not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or name in ("", ".."):
            return False
        try:
            st = os.lstat(folder / name)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
    return True
