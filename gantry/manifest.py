"""Weights manifests: the identity of a set of weight files.

The manifest digest is the sha256 of the sorted lines ``path<TAB>size<TAB>sha256\\n``: two
directories with the same files have the same digest, whatever the revision name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

_CHUNK = 1 << 20


class ManifestEntry(BaseModel):
    """One weight file: its path relative to the snapshot root, size and sha256."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def manifest_digest(entries: Iterable[ManifestEntry]) -> str:
    """sha256 of the canonical, path-sorted listing of ``entries``."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\t{e.size}\t{e.sha256}\n".encode())
    return h.hexdigest()


class WeightsManifest(BaseModel):
    """The files of a weights snapshot, and where they came from."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    commit: str
    files: tuple[ManifestEntry, ...]
    digest: str = Field(description="manifest_digest(files), stored for readers without code.")
    gated: bool = Field(
        default=False,
        description="The hub gates these files: using the cached copy still needs a token.",
    )

    @classmethod
    def build(
        cls, repo_id: str, commit: str, files: Iterable[ManifestEntry], *, gated: bool = False
    ) -> WeightsManifest:
        ordered = tuple(sorted(files, key=lambda e: e.path))
        return cls(
            repo_id=repo_id,
            commit=commit,
            files=ordered,
            digest=manifest_digest(ordered),
            gated=gated,
        )

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)


def sha256_file(path: Path) -> str:
    """sha256 of a file, read once in 1 MiB chunks (hashlib releases the GIL on them)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_oid(path: Path) -> str:
    """The git blob id of a file: sha1 of ``blob <size>\\0`` followed by the content."""
    with path.open("rb") as f:
        h = hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size, usedforsecurity=False)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_and_git_oid(path: Path) -> tuple[str, str]:
    """sha256 and git blob id of a file from ONE read of it (a downloaded file is checked
    against either, depending on how the hub stores it)."""
    with path.open("rb") as f:
        sha = hashlib.sha256()
        oid = hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size, usedforsecurity=False)
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            oid.update(chunk)
    return sha.hexdigest(), oid.hexdigest()


H = TypeVar("H")


def hash_many(
    paths: Sequence[Path],
    fn: Callable[[Path], H] = sha256_file,  # type: ignore[assignment]
    workers: int | None = None,
) -> list[H]:
    """Hash ``paths`` in parallel across cores; results in the order given."""
    if not paths:
        return []
    n = max(1, min(len(paths), workers or os.cpu_count() or 1))
    if n == 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hash") as pool:
        return list(pool.map(fn, paths))
