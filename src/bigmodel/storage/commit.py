"""The commit protocol of a save: a folder holds the old checkpoint or the new one, never a mix.

Call order: :meth:`Commit.clean_debris`, then :meth:`Commit.stage` once per file (data files
first, the index last), then :meth:`Commit.publish`; :meth:`Commit.abort` on any failure.

Why it is safe at every instant, for every reader:

1. Staged files have hidden temporary names; until they are renamed nothing refers to them.
2. If a new shard would replace a file that the current index refers to (a re-save with the
   same shard count), each such file is first hard-linked under an alias name and the index
   is atomically rewritten to refer to the aliases. The old checkpoint stays whole and
   loadable while the canonical names are replaced.
3. Data files are renamed into place, then the new index: that rename is the commit for
   readers that look for the index first (bigmodel, transformers for sharded folders).
4. Artefacts of the old checkpoint are removed, index files before the data they refer to,
   so a reader that prefers another layout (transformers reads ``model.safetensors`` before
   an index; accelerate reads ``pytorch_model.bin`` first) sees the old complete checkpoint
   until the moment it sees the new one.

Every rename and unlink is followed by a directory fsync when ``durable`` is set.
Where hard links are not supported (some FUSE and FAT filesystems) step 2 falls back to
renames, leaving a short window in which a crash can leave no loadable checkpoint; this is
logged as a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bigmodel.foundations.errors import CheckpointConflictError
from bigmodel.foundations.log import logger
from bigmodel.storage.atomic import (
    ALIAS_MARKER,
    TEMP_MARKER,
    alias_name,
    fsync_dir,
    new_token,
    open_temp,
    temp_name,
    write_all,
)
from bigmodel.storage.files import read_bounded

__all__ = ["Commit", "Layout", "is_ours"]


@dataclass(frozen=True)
class Layout:
    """The file names of a checkpoint layout, as far as the commit protocol needs them.

    The checkpoint layer provides it (:data:`bigmodel.checkpoint.naming.HF_LAYOUT`); storage
    knows no names of its own.
    """

    #: JSON files whose ``weight_map`` refers to data files by name; they are protected while a
    #: save replaces the files they refer to, and removed before those files.
    index_names: tuple[str, ...]
    #: True for a file that belongs to a checkpoint of this layout: a save that replaces the
    #: checkpoint removes every such file it did not write.
    is_artifact: Callable[[str], bool]
    #: The largest index worth reading (a larger one is not a live index of this layout).
    max_index_bytes: int


def is_ours(name: str) -> bool:
    """Debris of a bigmodel save: a staged temp file or an alias link."""
    return (name.startswith(".") and TEMP_MARKER in name) or (
        ALIAS_MARKER in name and name.endswith((".safetensors", ".bin"))
    )


def _index_refs(path: Path, limit: int) -> tuple[dict[str, Any], set[str]] | None:
    """The parsed index and the plain file names it refers to; None if it is absent or
    unreadable (too large, not a regular file, not JSON)."""
    try:
        obj = json.loads(
            read_bounded(path, limit, code="index-too-large", what="the index", hint="")
        )
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        return None
    refs = {
        v
        for v in obj["weight_map"].values()
        if isinstance(v, str) and "/" not in v and "\\" not in v
    }
    return obj, refs


class Commit:
    """One save's staged files in ``directory`` and the steps that publish them."""

    def __init__(
        self, directory: Path, *, layout: Layout, durable: bool, token: str | None = None
    ) -> None:
        self.directory = directory
        self.layout = layout
        self.durable = durable
        #: Marks every file of this save; ranks of a distributed save share one token.
        self.token = token or new_token()
        self._staged: dict[str, Path] = {}  # final name -> temp path
        #: True once the new checkpoint is what the folder loads (later failures are cleanup only).
        self.committed = False
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the folder's save lock (``flock`` on the directory itself; no lock file).

        Raises :class:`CheckpointConflictError` if another save into the folder is running.
        """
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointConflictError(
                f"Another save into {self.directory} is in progress [{CheckpointConflictError.code}]. "
                "Fix: wait for it to finish, or save into another folder; the folder will hold one complete checkpoint."
            ) from None
        except OSError:  # pragma: no cover - filesystems without flock: proceed unlocked
            os.close(fd)
            logger.warning(
                "cannot lock %s; concurrent saves into it are not detected", self.directory
            )
            return
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _sync(self) -> None:
        if self.durable:
            fsync_dir(self.directory)

    def _live_refs(self) -> set[str]:
        refs: set[str] = set()
        for name in self.layout.index_names:
            parsed = _index_refs(self.directory / name, self.layout.max_index_bytes)
            if parsed is not None:
                refs |= parsed[1]
        return refs

    def clean_debris(self) -> None:
        """Remove leftovers of earlier interrupted saves that no live index refers to."""
        self._remove_unreferenced(is_ours)

    def stage(self, final_name: str, write: Callable[[BinaryIO], object]) -> None:
        """Write one file under a temporary name (flushed and, if durable, fsync'd)."""
        path = self.directory / temp_name(final_name, self.token)
        with open_temp(path, durable=self.durable) as fh:
            self._staged[final_name] = path
            write(fh)

    def staged(self) -> dict[str, str]:
        """Final name -> temporary file name of every staged file (to hand to another rank)."""
        return {final: path.name for final, path in self._staged.items()}

    def adopt(self, staged: dict[str, str]) -> None:
        """Take over files another process staged in the same folder (see :meth:`staged`)."""
        for final, temp in staged.items():
            if final in self._staged:
                raise ValueError(f"{final} is staged twice")
            self._staged[final] = self.directory / temp

    def stage_bytes(self, final_name: str, data: bytes) -> None:
        self.stage(final_name, lambda fh: write_all(fh, data))

    def abort(self) -> None:
        """Remove what this save wrote and nothing refers to; never touches the old checkpoint.

        Best effort: it runs while an error is propagating, so its own failures are ignored.
        """
        self._staged.clear()
        with contextlib.suppress(OSError):
            self._remove_unreferenced(lambda name: is_ours(name) and self.token in name)

    def _remove_unreferenced(self, predicate: Callable[[str], bool]) -> None:
        live = self._live_refs()
        removed = False
        for name in os.listdir(self.directory):
            if predicate(name) and name not in live:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
                    removed = True
        if removed:
            self._sync()

    def publish(self, index_name: str | None, *, replaces_checkpoint: bool = True) -> None:
        """Make the staged files the checkpoint of the folder (see the module docstring).

        With ``replaces_checkpoint=False`` (a side file such as ``config.json``) the staged
        files are renamed into place and nothing else in the folder is removed.
        """
        new_names = set(self._staged)
        data_names = [n for n in self._staged if n != index_name]
        self._protect_old_checkpoint(set(data_names))
        for name in data_names:
            os.replace(self._staged.pop(name), self.directory / name)
        if index_name is None:
            self.committed = True
        self._sync()
        if index_name is not None:
            os.replace(self._staged.pop(index_name), self.directory / index_name)
            self.committed = True
            self._sync()
        if replaces_checkpoint:
            self._remove_stale(new_names)

    def _protect_old_checkpoint(self, incoming: set[str]) -> None:
        for index_name in self.layout.index_names:
            index_path = self.directory / index_name
            parsed = _index_refs(index_path, self.layout.max_index_bytes)
            if parsed is None:
                continue
            obj, refs = parsed
            colliding = sorted(refs & incoming)
            if not colliding:
                continue
            renamed: dict[str, str] = {}
            linked = True
            for name in colliding:
                alias = alias_name(name, self.token)
                try:
                    os.link(self.directory / name, self.directory / alias)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    linked = False
                    logger.warning(
                        "hard links are not supported in %s (%s); replacing %s without protecting the old "
                        "checkpoint, so a crash in the next moments can leave the folder unloadable",
                        self.directory,
                        exc,
                        index_name,
                    )
                    break
                renamed[name] = alias
            if not linked:
                for alias in renamed.values():
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / alias).unlink()
                continue
            obj["weight_map"] = {k: renamed.get(v, v) for k, v in obj["weight_map"].items()}
            rewritten = self.directory / temp_name(index_name, self.token + "-old")
            with open_temp(rewritten, durable=self.durable) as fh:
                write_all(fh, json.dumps(obj, indent=2, sort_keys=False).encode("utf-8") + b"\n")
            self._sync()  # the aliases must be durable before the index points at them
            os.replace(rewritten, index_path)
            self._sync()

    def _remove_stale(self, keep: set[str]) -> None:
        names = os.listdir(self.directory)
        stale = [
            n
            for n in names
            if n not in keep and (self.layout.is_artifact(n) or (is_ours(n) and self.token in n))
        ]
        # Index files first: while an old index exists, its data files must stay whole.
        stale.sort(key=lambda n: (not n.endswith(".index.json"), n))
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        if stale:
            self._sync()
        # Debris of earlier interrupted saves is unreferenced now that our index is live.
        self.clean_debris()
