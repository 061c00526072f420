from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from gantry.errors import ReleaseInProgressError
from gantry.record import Recorder, StageStatus, load_record, one_run_at_a_time
from gantry.spec import parse_spec

pytestmark = pytest.mark.unit

SPEC = parse_spec({"name": "minilm", "source": {"repo_id": "a/b", "revision": "v1"}})


class Out(BaseModel):
    value: int


def test_stage_is_reused_only_for_identical_inputs(tmp_path: Path) -> None:
    calls: list[int] = []

    def stage() -> Out:
        calls.append(1)
        return Out(value=len(calls))

    first = Recorder(tmp_path, SPEC, flow_run_id=None)
    assert first.run_stage("scan", stage, reuse=(Out, "sha256:a")).value == 1

    second = Recorder(tmp_path, SPEC, flow_run_id=None)
    again = second.run_stage("scan", stage, reuse=(Out, "sha256:a"))
    assert again.value == 1 and len(calls) == 1  # not run again
    record = load_record(second.path)
    assert record.stages["scan"].cached and record.stages["scan"].status == StageStatus.SUCCEEDED

    third = Recorder(tmp_path, SPEC, flow_run_id=None)
    assert third.run_stage("scan", stage, reuse=(Out, "sha256:b")).value == 2  # inputs changed
    assert len(list((tmp_path / "history").glob("*.json"))) == 2  # earlier records kept


def test_failed_stage_is_not_reused_and_later_stages_are_skipped(tmp_path: Path) -> None:
    def boom() -> Out:
        raise RuntimeError("no")

    rec = Recorder(tmp_path, SPEC, flow_run_id=None)
    with pytest.raises(RuntimeError):
        rec.run_stage("smoke", boom, reuse=(Out, "k"))
    data = json.loads(rec.path.read_text())
    assert data["status"] == "failed" and data["stages"]["smoke"]["status"] == "failed"
    assert data["stages"]["evaluate"]["status"] == "skipped"
    assert data["stages"]["smoke"]["error"]["type"] == "RuntimeError"

    calls: list[int] = []

    def ok() -> Out:
        calls.append(1)
        return Out(value=7)

    Recorder(tmp_path, SPEC, flow_run_id=None).run_stage("smoke", ok, reuse=(Out, "k"))
    assert calls == [1]


_HOLD = """
import sys, time
from pathlib import Path
from gantry.record import one_run_at_a_time
with one_run_at_a_time(Path(sys.argv[1]), sys.argv[2]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_run_of_a_release_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path), SPEC.release_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with (
            pytest.raises(ReleaseInProgressError) as info,
            one_run_at_a_time(tmp_path, SPEC.release_id),
        ):
            pass
        assert f"pid {holder.pid}" in info.value.message and "fix:" in str(info.value)
        with one_run_at_a_time(tmp_path, "another-release"):
            pass  # other releases are not held up
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait(timeout=30)
    with one_run_at_a_time(tmp_path, SPEC.release_id):
        pass
