"""Whole-or-nothing file writes that a killed writer cannot leave litter from.

A file is written to ``.<name>.<pid>.<random>.tmp`` beside it, flushed to disk and
renamed over it, so readers see the old content or the new, never half. A process killed
between the write and the rename (SIGKILL, OOM) leaves its temp file behind; the next
write of the same file removes every such file whose writer process is gone, so a re-run
cleans up after the run that was killed.

    write_atomic(path, record.model_dump_json(indent=2))
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from gantry.proc import pid_alive


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temp files of ``path`` left by writers that have died; those removed."""
    return _sweep(path.parent, lambda base: base == f".{path.name}")


def sweep_stale_prefix(directory: Path, prefix: str) -> list[Path]:
    """Remove the temp files in ``directory`` of any file named ``prefix*`` whose writers
    have died: for files no later write reuses the name of (each run's own record has a
    name of its own, so its next write never comes to sweep it); those removed."""
    return _sweep(directory, lambda base: base.startswith(f".{prefix}"))


def _sweep(directory: Path, wanted: Callable[[str], bool]) -> list[Path]:
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for tmp in directory.iterdir():
            # .<name>.<pid>.<random>.tmp, see write_atomic
            parts = tmp.name.removesuffix(".tmp").rsplit(".", 2)
            if not tmp.name.endswith(".tmp") or len(parts) != 3 or not wanted(parts[0]):
                continue
            pid = parts[1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def private_dir(path: Path, *, keep_search: bool = False) -> Path:
    """``path`` created (with parents) and made 0700: what is under it is the owner's.
    ``keep_search`` leaves an o+x already set (search without listing: the embedded
    PostgreSQL's user reaches its cluster under the state dir through it)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700 | (path.stat().st_mode & 0o001 if keep_search else 0))
    return path


def point_atomic(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` (relative, so the directory can move), replacing
    whatever was there at once: readers see the old file or the new one."""
    sweep_stale(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.symlink_to(os.path.relpath(target, link.parent))
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically; ``mode`` is set before the file appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no bytes copied), or a copy where a link cannot
    be made: another filesystem (a cache dir on its own disk, a bind mount in a
    container: EXDEV) or one that has no hard links."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)
