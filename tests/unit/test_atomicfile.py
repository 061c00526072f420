"""Atomic writes: whole or nothing, mode from the first byte, and the temp file of a writer
killed between write and rename removed by the next write of the same file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gantry.atomicfile import link_or_copy, sweep_stale, sweep_stale_prefix, write_atomic

pytestmark = pytest.mark.unit

# Writes the temp file the way write_atomic does, then hangs before the rename.
_STUCK = """
import os, sys, time
from pathlib import Path
path = Path(sys.argv[1])
tmp = path.with_name(f".{path.name}.{os.getpid()}.abcd1234.tmp")
tmp.write_text("half")
print(tmp, flush=True)
time.sleep(600)
"""


def _stuck_writer(path: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_replaces_whole_with_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "record.json"
    write_atomic(path, "one")
    write_atomic(path, b"two", mode=0o600)
    assert path.read_text() == "two"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_killed_writers_temp_file_is_swept_and_a_live_ones_is_not(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    dead, dead_tmp = _stuck_writer(path)
    alive, alive_tmp = _stuck_writer(path)
    other = tmp_path / ".other.json.1.tmp"  # another file's temp: not this file's to sweep
    other.write_text("x")
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_tmp.is_file()  # a kill runs no cleanup
        write_atomic(path, "new")
        assert not dead_tmp.exists()
        assert alive_tmp.is_file()  # its writer may still rename it
        assert other.is_file()
        assert path.read_text() == "new"
    finally:
        alive.kill()
        alive.wait(timeout=30)
    assert sweep_stale(path) == [alive_tmp]


def test_a_killed_runs_own_record_temp_is_swept_by_the_next_run(tmp_path: Path) -> None:
    """Each run's record has a name of its own (its start time), so no later write of that
    name comes to sweep its temp file: the release's next run sweeps them by prefix."""
    mine, other = tmp_path / "rel-a.20261207T035651.1.json", tmp_path / "rel-b.2026.json"
    dead, dead_tmp = _stuck_writer(mine)
    dead_other, other_tmp = _stuck_writer(other)
    alive, alive_tmp = _stuck_writer(tmp_path / "rel-a.20261207T040000.2.json")
    try:
        for proc in (dead, dead_other):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert sweep_stale_prefix(tmp_path, "rel-a.") == [dead_tmp]
        assert other_tmp.is_file() and alive_tmp.is_file()  # another release's; a live one
    finally:
        alive.kill()
        alive.wait(timeout=30)


def test_link_or_copy_links_on_one_filesystem_and_copies_across(tmp_path: Path) -> None:
    src = tmp_path / "wheel.whl"
    src.write_bytes(b"wheel bytes")
    linked = tmp_path / "ctx" / "wheel.whl"
    linked.parent.mkdir()
    link_or_copy(src, linked)
    assert linked.stat().st_ino == src.stat().st_ino
    # /dev/shm is a tmpfs of its own where there is one: os.link raises EXDEV there.
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to link across")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        with pytest.raises(OSError):
            os.link(src, other / "probe")
        link_or_copy(src, other / "wheel.whl")
        copied = other / "wheel.whl"
        assert copied.read_bytes() == b"wheel bytes" and copied.stat().st_ino != src.stat().st_ino
    finally:
        shutil.rmtree(other)
