"""Scratch dirs: removed on exit, swept after their owner is killed, never while it lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gantry.scratch import scratch_dir, sweep

pytestmark = pytest.mark.unit

_HOLD = """
import sys, time
from pathlib import Path
from gantry.scratch import scratch_dir
with scratch_dir(Path(sys.argv[1]), "snap-") as work:
    (work / "partial.bin").write_bytes(b"x" * 1000)
    print(work, flush=True)
    time.sleep(600)
"""


def _owner(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_removed_on_exit_and_on_error(tmp_path: Path) -> None:
    with scratch_dir(tmp_path, "snap-") as work:
        (work / "f").write_text("x")
    with pytest.raises(RuntimeError), scratch_dir(tmp_path, "snap-") as work:
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_owners_dir_is_swept_and_a_live_ones_is_not(tmp_path: Path) -> None:
    alive, alive_dir = _owner(tmp_path)
    dead, dead_dir = _owner(tmp_path)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_dir.is_dir()  # a kill runs no cleanup
        with scratch_dir(tmp_path, "snap-") as mine:  # entering sweeps
            assert not dead_dir.exists()
            assert (alive_dir / "partial.bin").is_file()  # still being written by its owner
            assert sweep(tmp_path, "snap-") == 0  # and this one's own dir is not taken
            assert mine.is_dir()
    finally:
        alive.kill()
        alive.wait(timeout=30)
    time.sleep(0.1)
    assert sweep(tmp_path, "snap-") == 1
    assert list(tmp_path.iterdir()) == []


def test_other_prefixes_are_left_alone(tmp_path: Path) -> None:
    dead, dead_dir = _owner(tmp_path)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(timeout=30)
    assert sweep(tmp_path, "ctx-") == 0 and dead_dir.is_dir()
