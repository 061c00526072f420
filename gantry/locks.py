"""Exclusive locks held by a live process: ``flock`` on a file, so the kernel drops a lock
the moment its holder dies (SIGKILL included) and no stale lock ever needs clearing.

    with exclusive(path, wait_s=60, holder=release_id, busy=lambda who: MyLockedError(who)):
        ...  # nobody else holds ``path`` meanwhile
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def holder_of(path: Path) -> str:
    """Who holds (or last held) the lock at ``path``: "<holder>, pid <pid>"."""
    try:
        data = json.loads(path.read_text() or "{}")
        return f"{data.get('holder', '?')}, pid {data.get('pid', '?')}"
    except (OSError, ValueError):
        return "unknown holder"


@contextlib.contextmanager
def exclusive(
    path: Path, *, wait_s: float, holder: str, busy: Callable[[str], Exception]
) -> Iterator[None]:
    """Hold the lock at ``path``; wait up to ``wait_s`` for another holder, then raise
    ``busy(who holds it)``. ``holder`` is written into the file for that message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, announced = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            other = holder_of(path)
            if time.monotonic() >= deadline:
                raise busy(other)
            if not announced:
                log.info("waiting for %s, held by %s", path, other)
                announced = True
            time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock
