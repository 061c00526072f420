"""Scratch directories that a killed run cannot leave behind for good.

A scratch dir ``<parent>/<prefix>XXXX/`` comes with a lock file ``<prefix>XXXX.lock`` beside
it that its owner keeps ``flock``-ed while it works. The kernel drops that lock when the
owner dies, however it dies (SIGKILL, OOM, power loss of a container), so the next
:func:`scratch_dir` under the same parent removes the dirs whose lock it can take, and never
touches one that a live run (another release sharing the cache) is still filling.

    with scratch_dir(store.tmp, "snap-") as work:
        ...  # download into work; moved out with os.replace when complete
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_LOCK = ".lock"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def sweep(parent: Path, prefix: str) -> int:
    """Remove the scratch dirs under ``parent`` whose owner has died; how many were."""
    removed = 0
    for lock in sorted(parent.glob(f"{prefix}*{_LOCK}")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue  # its owner finished meanwhile
        try:
            if not _try_lock(fd):
                continue  # alive
            work = lock.with_name(lock.name.removesuffix(_LOCK))
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
                log.info("removed %s, left by a run that was killed", work)
                removed += 1
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``parent``, removed on exit, and by a later call if the
    process dies first. Stale dirs of dead owners are swept on entry."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent, prefix)
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=_LOCK, dir=parent)
        lock = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A sweeper may have taken the fresh, not yet locked file for a dead one's and
        # unlinked it: then this lock guards nothing, start over with another name.
        with contextlib.suppress(FileNotFoundError):
            if lock.stat().st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    work = lock.with_name(lock.name.removesuffix(_LOCK))
    try:
        work.mkdir()
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
