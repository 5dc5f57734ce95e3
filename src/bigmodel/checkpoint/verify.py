"""Verifying a checkpoint's files against the digests recorded when they were written.

Files are re-hashed in parallel threads (hashing releases the GIL); each file gives at most
one :class:`~bigmodel.Problem`. A file without a recorded digest is reported as unverified:
only the structural checks done when the checkpoint was opened apply to it.
:func:`bigmodel.checkpoint.open.verify_checkpoint` also hashes the files of a checkpoint that
does not open, so that every problem is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from bigmodel.foundations.errors import CheckpointNotFoundError, Problem
from bigmodel.foundations.progress import progress_bar
from bigmodel.foundations.types import VerifyResult
from bigmodel.storage.digest import DIGEST_KEY, DIGESTS_KEY, buffer_digest, path_digest
from bigmodel.storage.safetensors import SafetensorsFile

if TYPE_CHECKING:
    from bigmodel.checkpoint.index import Reader

__all__ = ["check_file", "recorded_digests", "verify_files"]


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
    if actual is None:
        return Problem(
            path,
            "digest-unverifiable",
            f"the recorded digest {expected!r} is malformed or cannot be located in the file.",
            hint="re-save the checkpoint to record fresh digests.",
        )
    if actual != expected:
        return Problem(
            path,
            "digest-mismatch",
            f"the file's contents do not match the digest recorded when it was written (expected {expected}, got {actual}): it is corrupt.",
            hint="re-download or re-save this file.",
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
    problems: list[Problem] = []
    verified: list[str] = []
    files = [f for f in readers if f in expected]
    workers = max_workers or min(4, os.cpu_count() or 1)
    sizes = {f: readers[f].identity[2] for f in files}  # as opened: the path may have changed
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(
            total=sum(sizes.values()), desc=f"Verifying {directory.name}", progress=progress
        ) as bar,
    ):
        checks = pool.map(lambda f: check_file(directory, f, readers[f], expected[f]), files)
        for file, problem in zip(files, checks, strict=True):
            bar.update(sizes[file])
            if problem is None:
                verified.append(file)
            else:
                problems.append(problem)
    unverified = [f for f in readers if f not in expected]
    return VerifyResult(verified=verified, unverified=unverified, problems=problems)
