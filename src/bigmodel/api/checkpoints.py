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
from bigmodel.api.save import _save_workers, _state_dict, plan_state
from bigmodel.checkpoint.naming import CONFIG_NAME, HF_LAYOUT
from bigmodel.checkpoint.open import open_checkpoint
from bigmodel.execution.background import SaveHandle, submit, wait_for_saves
from bigmodel.execution.distributed import (
    broadcast_object,
    rank_of,
    resolve_group,
    run_step,
    save_group,
)
from bigmodel.execution.distributed_save import (
    DistributedSave,
    Entry,
    cached_local_state,
    gather_all,
    gather_inputs,
    planned_locally,
    restage_entries,
    staging_failed,
    staging_outcome,
)
from bigmodel.execution.writing import WriteOptions
from bigmodel.foundations import strict_json
from bigmodel.foundations.dtypes import parse_dtype
from bigmodel.foundations.errors import (
    BigModelError,
    CheckpointNotFoundError,
    InvalidCheckpointError,
)
from bigmodel.foundations.tensors import is_dtensor
from bigmodel.foundations.types import SaveResult
from bigmodel.foundations.units import parse_size
from bigmodel.storage.atomic import fsync_dir, new_token
from bigmodel.storage.commit import Commit
from bigmodel.storage.digest import DEFAULT_ALGORITHM, new_hasher
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
    newer one is durable. ``max_shard_size``, ``safe_serialization``, ``dtype`` (the model's
    weights only; optimizer state keeps its dtype), ``durable``, ``digest``,
    ``staging_memory`` and ``process_group`` mean what they mean for
    :func:`bigmodel.save_checkpoint`.

    Under ``torch.distributed``, a model with DTensor parameters (FSDP2's ``fully_shard``)
    or an explicit ``process_group`` makes :meth:`save` and :meth:`restore` collective:
    every rank calls them, in the same order. Each rank stages its own shards of the model
    and of the optimizer state; the model is written as a collective background save, the
    optimizer state is gathered to rank 0 (full tensors keyed by parameter names, so it
    restores at any world size) and written there with the side files, and rank 0 writes
    the marker only once every rank's part is durable, then rotates. ``restore`` loads the
    step rank 0 chose; each rank keeps only its slice of the optimizer state.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int | None = None,
        *,
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
        dtype: torch.dtype | str | None = None,
        durable: bool = True,
        digest: str | None = DEFAULT_ALGORITHM,
        staging_memory: int | str | None = None,
        workers: int | None = None,
        process_group: Any = None,
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r}: keep at least one step (or None for all).")
        if digest is not None:
            new_hasher(digest)  # an unknown algorithm fails here, not in the first save
        self.root = Path(root)
        self.keep_last = keep_last
        self._limit = parse_size(max_shard_size)
        self._opts = WriteOptions(
            safe=bool(safe_serialization),
            durable=durable,
            digest=digest,
            dtype=parse_dtype(dtype),
            progress=False,
        )
        self._staging = None if staging_memory is None else parse_size(staging_memory)
        self._workers = _save_workers(workers)
        self._process_group = process_group

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
        state = _state_dict(model, safe=self._opts.safe, cast=self._opts.dtype)
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
        group = self._group(state)
        if group is not None:
            return self._save_collective(step, state, opt_tensors, side, group, background)
        planned = plan_state(state, self._limit, self._opts)
        tensors = {**planned.stored, **{_OPT_PREFIX + k: v for k, v in opt_tensors.items()}}

        def job(staged: Mapping[str, torch.Tensor]) -> SaveResult:
            self._prepare(folder)
            result = planned.write(folder, staged, self._workers)
            self._complete(step, folder, result, side, _unprefixed(staged))
            return result

        if not background:
            return SaveHandle.completed(folder, job(tensors))
        return submit(folder, tensors, job, cast=self._opts.dtype, staging_memory=self._staging)

    def _group(self, state: Mapping[str, torch.Tensor]) -> Any:
        """The group a save is collective over (None: this process alone), as save_checkpoint."""
        sharded = any(is_dtensor(t) for t in state.values())
        if not sharded and self._process_group is None:
            return None
        return resolve_group(self._process_group)

    def _save_collective(
        self,
        step: int,
        state: dict[str, torch.Tensor],
        opt_tensors: dict[str, torch.Tensor],
        side: _Side,
        group: Any,
        background: bool,
    ) -> SaveHandle[SaveResult]:
        """Every rank stages its pieces; the worker of each rank runs :meth:`_collective_job`."""
        folder = self.path(step)
        wait_for_saves()  # the side group is the previous worker's until it is done
        sg = save_group(group)
        # planned without collectives in this thread; the workers compare the plans
        save = planned_locally(state, folder, self._opts, group=group, side=sg, limit=self._limit)
        opt, _ = cached_local_state(opt_tensors, group, side=sg, kind="optimizer")
        tensors = {
            **save.to_stage(),
            **{_OPT_PREFIX + k: v for k, v in gather_inputs(opt, rank_of(sg)).items()},
        }

        def job(staged: Mapping[str, torch.Tensor]) -> SaveResult:
            staging_outcome(sg, folder)
            save.restage({k: v for k, v in staged.items() if not k.startswith(_OPT_PREFIX)})
            return self._collective_job(step, save, restage_entries(opt, _unprefixed(staged)), side)

        if not background:
            return SaveHandle.completed(folder, job(tensors))
        return submit(
            folder,
            tensors,
            job,
            cast=self._opts.dtype,
            staging_memory=self._staging,
            failed=lambda error: staging_failed(sg, folder, error),
        )

    def _collective_job(
        self, step: int, save: DistributedSave, opt: Mapping[str, Entry], side: _Side
    ) -> SaveResult:
        """Rank 0 prepares the folder; all ranks write the model; the optimizer state is
        gathered to rank 0, which writes the side files, the marker, and rotates. Every step
        ends with an exchange of outcomes over the side group."""
        group, folder = save.group, save.directory
        leader = rank_of(group) == 0
        run_step(group, f"preparing {folder}", lambda: self._prepare(folder) if leader else None)
        result = save.run()
        gathered = run_step(group, "gathering the optimizer state", lambda: gather_all(opt, group))

        def complete() -> None:
            if leader:
                self._complete(step, folder, result, side, gathered)

        run_step(group, f"completing {folder}", complete)
        return result

    def _prepare(self, folder: Path) -> None:
        """The step's folder exists, without a marker: never complete while it is rewritten."""
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if created and self._opts.durable:
            fsync_dir(self.root)
        with contextlib.suppress(FileNotFoundError):
            (folder / MARKER_NAME).unlink()
            if self._opts.durable:
                fsync_dir(folder)

    def _complete(
        self,
        step: int,
        folder: Path,
        result: SaveResult,
        side: _Side,
        opt: Mapping[str, torch.Tensor],
    ) -> None:
        """After the model is durable: side files, then the marker, then rotation."""
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
        are filled with ``copy_``, so an optimizer built on them keeps working. Collective
        for a sharded model or with a ``process_group`` (every rank calls it): the step is
        the one rank 0 finds, so all ranks load the same one.
        """
        if step is None:
            group = self._group(model.state_dict())
            step = self.latest() if group is None else broadcast_object(group, self.latest())
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
        if any(is_dtensor(t) for t in model.state_dict().values()):
            _load_in_place(model, folder)  # keeps the parameter objects the optimizer holds
        else:
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
            tensors = {k: ckpt.get_tensor(k) for k in ckpt.keys()}  # views; copied per rank's part
            load_named_optimizer_state(
                model, optimizer, document, tensors, path=str(folder / OPTIMIZER_JSON)
            )


def _load_in_place(model: nn.Module, folder: Path) -> None:
    """Copy ``folder``'s tensors into ``model``'s own (each rank its DTensors' slices).

    A sharded load assigns new DTensor parameters (``fully_shard`` re-registers them), which
    an optimizer built on the old ones would no longer update; a restore copies instead."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    targets = model.state_dict(keep_vars=True)
    with open_checkpoint(folder) as ckpt:
        missing = sorted(set(targets) - set(ckpt.keys()))
        extra = sorted(set(ckpt.keys()) - set(targets))
        if missing or extra:
            raise InvalidCheckpointError.one(
                str(folder),
                "key-mismatch",
                f"the checkpoint lacks {missing[:5]} and holds unexpected {extra[:5]} "
                f"(of {len(missing)} missing, {len(extra)} unexpected)",
                hint="restore into a model built like the saved one",
            )
        with torch.no_grad():
            for name, target in targets.items():
                if not is_dtensor(target):
                    target.copy_(ckpt.get_tensor(name))
                    continue
                shape, offset = compute_local_shape_and_global_offset(
                    target.shape,
                    target.device_mesh,
                    target.placements,
                )
                index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                if all(shape):
                    target.to_local().copy_(ckpt.get_slice(name)[index])


def _unprefixed(staged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer's tensors among ``staged``, under their own names."""
    return {k.removeprefix(_OPT_PREFIX): v for k, v in staged.items() if k.startswith(_OPT_PREFIX)}


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
