"""Verifying a checkpoint's files against the digests recorded when they were written.

Files are re-hashed in parallel threads (hashing releases the GIL); each file gives at most
one :class:`~bigmodel.Problem`. A file without a recorded digest is reported as unverified:
only the structural checks done when the checkpoint was opened apply to it.
:func:`bigmodel.checkpoint.open.verify_checkpoint` also hashes the files of a checkpoint that
does not open, so that every problem is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from bigmodel.foundations.errors import CheckpointNotFoundError, Problem
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import VerifyResult
from bigmodel.storage.digest import DIGEST_KEY, DIGESTS_KEY, buffer_digest, path_digest
from bigmodel.storage.remote_safetensors import RemoteSafetensorsFile
from bigmodel.storage.safetensors import SafetensorsFile

if TYPE_CHECKING:
    from bigmodel.checkpoint.index import Reader

__all__ = [
    "check_file",
    "check_remote_file",
    "digest_problem",
    "recorded_digests",
    "verify_files",
    "verify_remote",
]


def recorded_digests(
    index_metadata: Mapping[str, object], readers: Mapping[str, Reader]
) -> dict[str, str]:
    """The digest recorded for each file: by the index (``index_metadata``, empty for a single
    file), else embedded in the file itself."""
    recorded = index_metadata.get(DIGESTS_KEY)
    out = (
        {k: v for k, v in recorded.items() if isinstance(v, str)}
        if isinstance(recorded, dict)
        else {}
    )
    for file, reader in readers.items():
        embedded = reader.metadata.get(DIGEST_KEY)
        if isinstance(embedded, str) and file not in out:
            out[file] = embedded
    return out


def check_file(directory: Path, file: str, reader: Reader, expected: str) -> Problem | None:
    """Re-hash one file and compare with ``expected``; None when it matches."""
    path = str(directory / file)
    try:
        if isinstance(reader, SafetensorsFile):
            embedded = reader.metadata.get(DIGEST_KEY) == expected
            actual = buffer_digest(reader.mapping(), expected, embedded=embedded)
        else:
            actual = path_digest(directory / file, expected, reader.identity)
    except (FileExistsError, CheckpointNotFoundError):
        return Problem(
            path,
            "file-changed",
            "the file was replaced or removed after the checkpoint was opened.",
            hint="reopen the checkpoint and verify again.",
        )
    return digest_problem(
        path,
        expected,
        actual,
        unverifiable_hint="re-save the checkpoint to record fresh digests.",
        mismatch_hint="re-download or re-save this file.",
    )


def check_remote_file(file: str, reader: Reader, expected: str) -> Problem | None:
    """Re-hash one file of a remote checkpoint (read by range, in order, one chunk in memory),
    or its copy in the local cache; None when it matches ``expected``."""
    if not isinstance(reader, RemoteSafetensorsFile):  # a copy in the local cache
        assert isinstance(reader.path, Path)
        return check_file(reader.path.parent, file, reader, expected)
    hint = "re-upload or re-save this file."
    actual = reader.digest(expected)
    return digest_problem(
        str(reader.path), expected, actual, unverifiable_hint=hint, mismatch_hint=hint
    )


def digest_problem(
    path: str, expected: str, actual: str | None, *, unverifiable_hint: str, mismatch_hint: str
) -> Problem | None:
    """The problem of a file whose digest is ``actual`` (None: it could not be computed) where
    ``expected`` was recorded; None when they match."""
    if actual is None:
        return Problem(
            path,
            "digest-unverifiable",
            f"the recorded digest {expected!r} is malformed or cannot be located in the file.",
            hint=unverifiable_hint,
        )
    if actual != expected:
        return Problem(
            path,
            "digest-mismatch",
            f"the file's contents do not match the digest recorded when it was written (expected {expected}, got {actual}): it is corrupt.",
            hint=mismatch_hint,
        )
    return None


def verify_files(
    directory: Path,
    readers: Mapping[str, Reader],
    expected: Mapping[str, str],
    *,
    max_workers: int | None = None,
    progress: bool | None = None,
) -> VerifyResult:
    """Check every file of ``readers`` that has an ``expected`` digest, files in parallel."""
    return _verify_each(
        readers,
        expected,
        lambda f: check_file(directory, f, readers[f], expected[f]),
        desc=f"Verifying {directory.name}",
        workers=max_workers or min(4, os.cpu_count() or 1),
        progress=progress,
    )


def verify_remote(
    readers: Mapping[str, Reader], expected: Mapping[str, str], *, progress: bool | None = None
) -> VerifyResult:
    """:func:`verify_files` for a remote checkpoint's files (see :func:`check_remote_file`)."""
    return _verify_each(
        readers,
        expected,
        lambda f: check_remote_file(f, readers[f], expected[f]),
        desc="Verifying",
        workers=4,
        progress=progress,
    )


def _verify_each(
    readers: Mapping[str, Reader],
    expected: Mapping[str, str],
    check: Callable[[str], Problem | None],
    *,
    desc: str,
    workers: int,
    progress: bool | None,
) -> VerifyResult:
    """Run ``check`` on every file with an ``expected`` digest, in parallel threads."""
    problems: list[Problem] = []
    verified: list[str] = []
    files = [f for f in readers if f in expected]
    sizes = {f: readers[f].identity[2] for f in files}  # as opened: the path may have changed
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=sum(sizes.values()), desc=desc, progress=progress) as bar,
    ):
        for file, problem in zip(files, pool.map(check, files), strict=True):
            bar.update(sizes[file])
            if problem is None:
                verified.append(file)
            else:
                problems.append(problem)
    unverified = [f for f in readers if f not in expected]
    return VerifyResult(verified=verified, unverified=unverified, problems=problems)
