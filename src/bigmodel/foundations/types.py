"""Result and option types of the public verbs: plain data, no behaviour beyond properties.

Results say what a call did (:class:`LoadReport`, :class:`SaveResult`, :class:`VerifyResult`,
:class:`RewriteResult`); options group the settings of one advanced concern of a load
(:class:`OffloadOptions`, :class:`DistributedOptions`, :class:`IOOptions`), so that the common
call stays short and each concern is documented in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bigmodel.foundations.errors import Problem


class MismatchedKey(NamedTuple):
    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class LoadReport:
    """What a load did. Names are module keys; tied names filled through a partner are not missing."""

    checkpoint: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[MismatchedKey] = field(default_factory=list)
    #: Module tensors the checkpoint did not provide, initialised by their module's initialiser.
    initialized_keys: list[str] = field(default_factory=list)
    #: Checkpoint keys that were read.
    loaded_keys: list[str] = field(default_factory=list)
    #: Checkpoint key -> module key, for every key whose name changed.
    renamed_keys: dict[str, str] = field(default_factory=dict)
    #: ``"removed 'model.'"`` or ``"added 'model.'"`` if a whole-model prefix was detected.
    prefix: str | None = None
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class SaveResult:
    """What a save wrote. ``files`` are weight file names relative to ``directory``."""

    directory: Path
    files: list[str]
    index_file: str | None
    total_size: int
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`Checkpoint.verify`: files whose digest matched, files with no digest
    recorded (only structural checks apply to them), and every problem found."""

    verified: list[str]
    unverified: list[str]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RewriteResult:
    saved: SaveResult
    source_format: str
    copied_files: list[str]
