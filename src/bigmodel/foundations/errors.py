"""The whole error hierarchy, in one place. Every error raised on purpose derives from
:class:`BigModelError`; each also derives from the built-in exception a caller would catch
without knowing bigmodel (``ValueError``, ``FileNotFoundError``, ``OSError``...)::

    BigModelError
    ├── InvalidCheckpointError (ValueError)      a file or index breaks a rule; .problems
    │   └── UnsafeCheckpointError                a pickle that weights-only loading refuses
    ├── CheckpointNotFoundError (FileNotFoundError)
    ├── CheckpointPermissionError (PermissionError)
    ├── KeyMismatchError (ValueError)            strict load: missing/unexpected/mis-shaped keys
    │   └── LoadStateDictError (RuntimeError)    the same, from load_sharded_checkpoint (torch's type)
    ├── KeyMappingError (ValueError)             two checkpoint keys renamed to one module key
    ├── MetaTensorError (ValueError)             a tensor on meta (no data): left by a load, or an
    │                                            offloaded tensor used outside its unit
    ├── MissingInitializerError (ValueError)     a missing tensor nobody can initialise
    ├── PlanError (ValueError)                   no device placement fits the budgets
    ├── UnsupportedTensorError (ValueError)      a state-dict entry that cannot be saved
    ├── CheckpointConflictError                  another save into the folder is running
    ├── CheckpointWriteError (OSError)           a save failed; the previous checkpoint is intact
    ├── RemoteError (OSError)                    a URL read failed after the retries; .url, .status
    └── DistributedError (RuntimeError)          a step failed on some rank; raised on every rank

Messages name the file or key, state the rule that was broken (with a stable short code in
``[brackets]``, also available as ``.code``), and say what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BigModelError",
    "CheckpointConflictError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointWriteError",
    "DistributedError",
    "InvalidCheckpointError",
    "KeyMappingError",
    "KeyMismatchError",
    "LoadStateDictError",
    "MAX_LISTED",
    "MAX_PROBLEMS",
    "MetaTensorError",
    "MissingInitializerError",
    "PlanError",
    "Problem",
    "ProblemList",
    "RemoteError",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
]


class BigModelError(Exception):
    """Root of every error raised on purpose by bigmodel."""

    code: str = "bigmodel"


@dataclass(frozen=True)
class Problem:
    """One broken rule in one file; :class:`InvalidCheckpointError` carries a list of them."""

    file: str
    code: str
    message: str
    key: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file if self.key is None else f"{self.file}, tensor {self.key!r}"
        text = f"{where}: [{self.code}] {self.message}"
        if self.hint:
            text += f" Fix: {self.hint}"
        return text


#: Problems kept per validation; beyond it they are only counted (a hostile file can break a
#: rule a million times, and a million problems would cost a gigabyte).
MAX_PROBLEMS = 100
#: Problems spelled out in an error message; the rest are summarised as "... and N more".
MAX_LISTED = 20


class ProblemList(list[Problem]):
    """The problems of one validation: the first :data:`MAX_PROBLEMS` are kept, the rest only
    counted in :attr:`dropped`."""

    def __init__(self, problems: Iterable[Problem] = ()) -> None:
        super().__init__()
        self.dropped = 0
        self.extend(problems)

    def append(self, problem: Problem) -> None:
        if len(self) < MAX_PROBLEMS:
            super().append(problem)
        else:
            self.dropped += 1

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.append(problem)
        self.dropped += getattr(problems, "dropped", 0)

    @property
    def total(self) -> int:
        return len(self) + self.dropped


class InvalidCheckpointError(BigModelError, ValueError):
    """A checkpoint breaks a rule of the format. ``.problems`` holds the problems found (at
    most :data:`MAX_PROBLEMS`); ``.total`` counts them all."""

    def __init__(self, problems: Sequence[Problem] | Problem) -> None:
        kept = ProblemList([problems] if isinstance(problems, Problem) else problems)
        self.problems: tuple[Problem, ...] = tuple(kept)
        assert self.problems, "InvalidCheckpointError needs at least one problem"
        self.total = kept.total
        self.code = self.problems[0].code
        if self.total == 1:
            message = str(self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems[:MAX_LISTED])
            more = self.total - min(len(self.problems), MAX_LISTED)
            tail = f"\n  ... and {more} more" if more else ""
            message = f"{self.total} problems found in the checkpoint:\n{lines}{tail}"
        super().__init__(message)

    @classmethod
    def one(
        cls, file: str, code: str, message: str, *, key: str | None = None, hint: str | None = None
    ) -> InvalidCheckpointError:
        return cls(Problem(file=file, code=code, message=message, key=key, hint=hint))


class UnsafeCheckpointError(InvalidCheckpointError):
    """A pickled (``.bin``) checkpoint that ``torch.load(weights_only=True)`` refuses."""


class CheckpointNotFoundError(BigModelError, FileNotFoundError):
    """No checkpoint at the given path."""

    code = "not-found"


class KeyMismatchError(BigModelError, ValueError):
    """A strict load found missing, unexpected or mis-shaped keys; the message lists them all."""

    code = "key-mismatch"

    def __init__(
        self,
        *,
        checkpoint: str,
        missing_keys: Iterable[str] = (),
        unexpected_keys: Iterable[str] = (),
        mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
        can_ignore_mismatched: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        mismatched = list(mismatched)
        self.mismatched_keys = [name for name, _, _ in mismatched]
        described = [
            f"{name} (checkpoint {list(ckpt)}, model {list(model)})"
            for name, ckpt, model in mismatched
        ]
        parts = [f"Error(s) loading {checkpoint} into the model [{self.code}]:"]
        for title, keys in (
            ("missing from the checkpoint", self.missing_keys),
            ("in the checkpoint but not in the model", self.unexpected_keys),
            ("with a different shape in the checkpoint and in the model", described),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (
                    f", ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
                )
                parts.append(f"  {len(keys)} key(s) {title}: {shown}")
        fix = "Fix: check that the checkpoint belongs to this model class and configuration"
        if self.missing_keys or self.unexpected_keys:
            fix += ", or pass strict=False and inspect the returned missing_keys/unexpected_keys"
        if can_ignore_mismatched and mismatched:
            fix += ", or pass ignore_mismatched_sizes=True to initialise the mis-shaped weights instead"
        parts.append(fix + ".")
        super().__init__("\n".join(parts))


class LoadStateDictError(KeyMismatchError, RuntimeError):
    """The :class:`KeyMismatchError` of :func:`bigmodel.load_sharded_checkpoint`: also a
    ``RuntimeError``, the type torch's ``load_state_dict`` and transformers'
    ``load_sharded_checkpoint`` raise, so code written for them catches it."""

    @classmethod
    def of(cls, error: KeyMismatchError) -> LoadStateDictError:
        """``error`` as this type: the same message and key lists."""
        converted = cls.__new__(cls)
        converted.args = error.args
        converted.__dict__.update(vars(error))
        return converted


class CheckpointPermissionError(BigModelError, PermissionError):
    """A checkpoint file or folder cannot be read or written by this user."""

    code = "permission-denied"


class CheckpointConflictError(BigModelError):
    """Another save into the same folder is in progress."""

    code = "save-conflict"


class CheckpointWriteError(BigModelError, OSError):
    """Writing a checkpoint failed; the previous checkpoint in the folder is left intact."""

    code = "write-failed"


class UnsupportedTensorError(BigModelError, ValueError):
    """A state dict entry that cannot be written (meta/sparse tensor, unsupported dtype, not a tensor)."""

    code = "unsupported-tensor"


class MetaTensorError(BigModelError, ValueError):
    """A tensor on the ``meta`` device (no data) where data is needed: a load would leave a
    parameter or buffer there (``[left-on-meta]``), or an offloaded tensor was used outside
    the forward of its unit (``[offloaded-outside-unit]``, see
    :mod:`bigmodel.execution.placeholders`)."""

    code = "left-on-meta"


class MissingInitializerError(BigModelError, ValueError):
    """A tensor is missing from the checkpoint and no initialiser can create it."""

    code = "no-initializer"


class KeyMappingError(BigModelError, ValueError):
    """Two checkpoint keys were renamed to the same module key."""

    code = "key-collision"


class DistributedError(BigModelError, RuntimeError):
    """One or more ranks failed; raised on every rank, naming each failing rank and its error."""

    code = "rank-failed"

    def __init__(self, what: str, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        ranks = ", ".join(str(r) for r in self.failures)
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in self.failures.items())
        super().__init__(
            f"{what} failed on rank(s) {ranks} of the process group [{self.code}]:\n{lines}\n"
            "Every rank stopped here; the failing rank's own exception is chained on that rank."
        )


class PlanError(BigModelError, ValueError):
    """No placement of the model fits the budgets."""

    code = "no-placement"


class RemoteError(BigModelError, OSError):
    """Reading a remote checkpoint failed after the retries: names the URL and the HTTP status
    (None when no answer came: connection refused, body cut short)."""

    code = "remote-read-failed"

    def __init__(self, url: str, status: int | None, message: str) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
