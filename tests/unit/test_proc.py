from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gantry.errors import CommandError, CommandTimeoutError, ToolNotFoundError, is_transient
from gantry.proc import redact_argv, redact_text, run, which

pytestmark = pytest.mark.unit


def test_redact_argv_hides_secret_flags_and_known_values() -> None:
    argv = ["tool", "--password", "hunter22", "--token=abcd1234", "--x", "s3cr3tvalue"]
    assert redact_argv(argv, ["s3cr3tvalue"]) == [
        "tool",
        "--password",
        "***",
        "--token=***",
        "--x",
        "***",
    ]


def test_redact_text_patterns() -> None:
    text = "https://user:pa55@host/x Authorization: Bearer abc.def hf_" + "a" * 30
    out = redact_text(text)
    assert "pa55" not in out and "abc.def" not in out and "hf_aaaa" not in out


def test_run_captures_and_checks(tmp_path: Path) -> None:
    done = run([sys.executable, "-c", "print('hi')"], timeout_s=30)
    assert done.stdout.strip() == "hi" and done.returncode == 0
    with pytest.raises(CommandError) as e:
        run(
            [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
            timeout_s=30,
        )
    assert e.value.returncode == 3 and "boom" in str(e.value)
    assert not is_transient(e.value)


def test_run_redacts_secret_env_in_errors() -> None:
    with pytest.raises(CommandError) as e:
        run(
            [
                sys.executable,
                "-c",
                "import os,sys; sys.stderr.write(os.environ['MY_TOKEN']); sys.exit(1)",
            ],
            timeout_s=30,
            env={"MY_TOKEN": "tok-very-secret"},
        )
    assert "tok-very-secret" not in str(e.value)


def test_run_timeout_is_transient() -> None:
    with pytest.raises(CommandTimeoutError) as e:
        run([sys.executable, "-c", "import time; time.sleep(5)"], timeout_s=0.5)
    assert is_transient(e.value)


def test_which(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ToolNotFoundError, match="GANTRY_NOPE_BIN"):
        which("gantry-no-such-tool", env_var="GANTRY_NOPE_BIN", install_hint="install it")
    monkeypatch.setenv("GANTRY_NOPE_BIN", str(tmp_path / "missing"))
    with pytest.raises(ToolNotFoundError, match="not an executable"):
        which("gantry-no-such-tool", env_var="GANTRY_NOPE_BIN", install_hint="install it")


def test_a_recorded_pid_that_another_process_now_has_is_not_taken_for_the_service(
    tmp_path: Path,
) -> None:
    """After a reboot, or in a restarted container (a new pid namespace), the pid in a
    service's pidfile may belong to anything: `start` would wait for it, then kill it."""
    import os

    from gantry.localenv.services import ManagedProcess
    from gantry.proc import process_start

    svc = ManagedProcess(
        name="x", argv=["true"], host="127.0.0.1", port=1, health_path="/", run_dir=tmp_path
    )
    me, started = os.getpid(), process_start(os.getpid())
    assert started is not None
    svc.pidfile.write_text(f"{me} {started}\n")
    assert svc.pid() == me
    svc.pidfile.write_text(f"{me} {int(started) + 1}\n")
    assert svc.pid() is None
    svc.pidfile.write_text(f"{me}\n")  # written before start times were recorded
    assert svc.pid() == me
