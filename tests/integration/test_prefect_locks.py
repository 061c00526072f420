"""The cross-host lock (`gantry.locks.prefect_exclusive`) against a real Prefect server:
holders in processes of their own, as on two hosts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from gantry.errors import GantryError, LockServiceUnavailableError, TransientError
from gantry.locks import prefect_exclusive
from tests.support import REPO_ROOT, PrefectServer, free_port

pytestmark = pytest.mark.integration

LEASE_S = 60.0  # the least the server accepts
#: Lease, then the server's repossessor loop (15 s by default), then slack.
EXPIRY_BOUND_S = LEASE_S + 15 + 5

_HOLDER = """
import sys
from gantry.locks import prefect_exclusive
name, holder, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
with prefect_exclusive(name, wait_s=0, holder=holder, busy=RuntimeError, lease_s=lease):
    print("held", flush=True)
    sys.stdin.read()  # holds until stdin closes (or the process is killed)
print("released", flush=True)
"""


class BusyError(GantryError):
    pass


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


def _name() -> str:
    return f"gantry-test-{uuid.uuid4().hex[:8]}"


@contextmanager
def _holder(server: PrefectServer, name: str, holder: str) -> Iterator[subprocess.Popen[str]]:
    """Another "host" holding ``name`` until the block ends (stdin closed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, name, holder, str(LEASE_S)],
        env={**os.environ, **server.env()},
        cwd=REPO_ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "held", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _take(name: str, wait_s: float) -> None:
    with prefect_exclusive(name, wait_s=wait_s, holder="test", busy=BusyError, lease_s=LEASE_S):
        pass


def test_second_holder_waits_and_gets_the_lock_after_the_first_releases(
    api: PrefectServer,
) -> None:
    name = _name()
    with _holder(api, name, "release A") as first:
        assert first.stdin is not None
        first.stdin.close()  # A releases about now; B, waiting, gets it
        t0 = time.monotonic()
        _take(name, wait_s=30)
        waited = time.monotonic() - t0
        assert first.wait(timeout=30) == 0
    assert waited < 10


def test_no_wait_fails_at_once_naming_the_holder(api: PrefectServer) -> None:
    name = _name()
    with _holder(api, name, "release A") as first:
        t0 = time.monotonic()
        with pytest.raises(BusyError) as info:
            _take(name, wait_s=0)
        assert time.monotonic() - t0 < 5
        assert f"release A, host {os.uname().nodename}, pid {first.pid}" in str(info.value)


def test_waits_up_to_wait_s_then_names_the_holder(api: PrefectServer) -> None:
    name = _name()
    with _holder(api, name, "release A"):
        t0 = time.monotonic()
        with pytest.raises(BusyError, match="release A"):
            _take(name, wait_s=3)
        assert 3 <= time.monotonic() - t0 < 8


def test_a_killed_holders_lock_frees_within_the_lease_bound(api: PrefectServer) -> None:
    name = _name()
    with _holder(api, name, "release A") as first:
        # past one lease term: the holder's renewals keep it, nobody else gets it
        time.sleep(LEASE_S + 5)
        with pytest.raises(BusyError, match="release A"):
            _take(name, wait_s=0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed = time.monotonic()
        while True:
            try:
                _take(name, wait_s=0)
                break
            except BusyError:
                assert time.monotonic() - killed < EXPIRY_BOUND_S, "lock never freed"
                time.sleep(0.5)
    freed_after = time.monotonic() - killed
    print(f"lock freed {freed_after:.1f}s after SIGKILL (lease {LEASE_S}s)")
    assert freed_after < EXPIRY_BOUND_S


def test_different_names_do_not_block_each_other(api: PrefectServer) -> None:
    with _holder(api, _name(), "release A"):
        t0 = time.monotonic()
        _take(_name(), wait_s=0)
        assert time.monotonic() - t0 < 5


def test_the_same_name_is_taken_again_after_release(api: PrefectServer) -> None:
    name = _name()
    _take(name, wait_s=0)  # creates the limit
    _take(name, wait_s=0)  # finds it, and the slot was released


def test_an_unreachable_api_is_transient_and_names_the_fix() -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    with (
        temporary_settings(updates={PREFECT_API_URL: dead}),
        pytest.raises(LockServiceUnavailableError) as info,
    ):
        _take(_name(), wait_s=0)
    assert isinstance(info.value, TransientError)
    assert "PREFECT_API_URL" in str(info.value) and "gantry env up" in str(info.value)
