from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
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
    # Every run's own record is kept (the third's too: it is the latest).
    assert len(list((tmp_path / "history").glob("*.json"))) == 3


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


def test_runs_that_stopped_before_a_stage_are_looked_through_for_its_last_result(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    def stage(tag: str) -> Out:
        calls.append(tag)
        return Out(value=len(calls))

    def boom() -> Out:
        raise RuntimeError("hub down")

    done = Recorder(tmp_path, SPEC, flow_run_id=None)
    done.run_stage("evaluate", lambda: stage("first"), reuse=(Out, "k"))
    done.succeed()
    # A run that failed upstream (evaluate skipped), then one killed before evaluate
    # (still pending): both are looked through, back to the success.
    with pytest.raises(RuntimeError):
        Recorder(tmp_path, SPEC, flow_run_id=None).run_stage("weights", boom)
    Recorder(tmp_path, SPEC, flow_run_id=None).run_stage("weights", lambda: stage("w"))

    resumed = Recorder(tmp_path, SPEC, flow_run_id=None)
    assert resumed.run_stage("evaluate", lambda: stage("again"), reuse=(Out, "k")).value == 1
    assert calls == ["first", "w"] and load_record(resumed.path).stages["evaluate"].cached

    # Where the stage last ran and failed, an older success is not dug up.
    with pytest.raises(RuntimeError):
        Recorder(tmp_path, SPEC, flow_run_id=None).run_stage(
            "evaluate", boom, reuse=(Out, "k"), may_reuse=False
        )
    Recorder(tmp_path, SPEC, flow_run_id=None).run_stage(
        "evaluate", lambda: stage("rerun"), reuse=(Out, "k")
    )
    assert calls[-1] == "rerun"

    # Another release's history is never read, however its id begins.
    other = parse_spec({"name": "minilm", "source": {"repo_id": "a/b", "revision": "v2"}})
    fresh = Recorder(tmp_path, other, flow_run_id=None)
    assert fresh.run_stage("evaluate", lambda: stage("other"), reuse=(Out, "k")).value == len(calls)
    assert calls[-1] == "other"


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


def test_register_is_reused_only_while_the_store_is_as_the_last_success_left_it(
    tmp_path: Path,
) -> None:
    calls: list[int] = []

    def stage() -> Out:
        calls.append(1)
        return Out(value=len(calls))

    def run(state: str | None, *, succeed: bool = True) -> Recorder:
        rec = Recorder(tmp_path, SPEC, flow_run_id=None)
        unchanged = rec.store_unchanged(state)
        rec.run_stage("register", stage, reuse=(Out, "k"), may_reuse=unchanged)
        if succeed:
            rec.succeed(tracking_store_state=state)
        return rec

    run("s1")
    assert len(calls) == 1
    run("s1")  # unchanged since the success: re-used
    assert (
        len(calls) == 1
        and load_record(tmp_path / f"{SPEC.release_id}.json").stages["register"].cached
    )
    run("s2")  # the store changed: asked again, and the new state remembered
    assert len(calls) == 2
    run("s2", succeed=False)  # a run that failed later, writing nothing: still re-used
    run("s2")
    assert len(calls) == 2
    run("s2", succeed=False)
    run("s3")  # whatever wrote to the store since the last success, it is asked again
    assert len(calls) == 3
    run(None)  # a store with no fingerprint (a server) is always asked
    run(None)
    assert len(calls) == 5


def test_records_are_private_and_hold_no_secret(tmp_path: Path) -> None:
    """0600 records in 0700 directories (history too); a secret that got into a spec
    around its validation is redacted as MLflow's params redact it."""
    from gantry.proc import REDACTED
    from gantry.record import stored_spec, write_failed_record

    releases = tmp_path / "releases"
    rec = Recorder(releases, SPEC, flow_run_id=None)
    Recorder(releases, SPEC, flow_run_id=None)  # a second run: both have their own file
    kept = list((releases / "history").iterdir())
    assert len(kept) == 2
    for path in (rec.path, *kept):
        assert path.stat().st_mode & 0o777 == 0o600, path
    for d in (releases, releases / "history"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    failed = write_failed_record(tmp_path / "other", SPEC, RuntimeError("x"))
    assert failed.stat().st_mode & 0o777 == 0o600

    # Built around the validation (model_copy does not validate), as a bug or a plugin might.
    runtime = SPEC.runtime.model_copy(update={"env": {"HF_TOKEN": "hf_" + "a" * 30, "MODE": "x"}})
    mlflow = SPEC.mlflow.model_copy(update={"tracking_uri": "https://tok3n@mlflow.example/"})
    leaky = SPEC.model_copy(update={"runtime": runtime, "mlflow": mlflow})
    stored = stored_spec(leaky)
    assert stored["runtime"]["env"] == {"HF_TOKEN": REDACTED, "MODE": "x"}
    assert stored["mlflow"]["tracking_uri"] == f"https://{REDACTED}@mlflow.example/"
    assert "tok3n" not in json.dumps(stored) and "hf_aaa" not in json.dumps(stored)
    assert stored_spec(SPEC) == SPEC.model_dump(mode="json")  # a valid spec is unchanged


def test_a_result_that_expired_since_is_not_reused(tmp_path: Path) -> None:
    """Same inputs, but what the result was decided on has changed (an allowlist entry
    expired, the DB aged): the stage runs again."""
    calls: list[int] = []

    def stage() -> Out:
        calls.append(1)
        return Out(value=len(calls))

    Recorder(tmp_path, SPEC, flow_run_id=None).run_stage("scan", stage, reuse=(Out, "a"))
    rec = Recorder(tmp_path, SPEC, flow_run_id=None)
    fresh = rec.run_stage("scan", stage, reuse=(Out, "a"), stale=lambda r: None)
    assert fresh.value == 1 and len(calls) == 1
    rec = Recorder(tmp_path, SPEC, flow_run_id=None)
    again = rec.run_stage("scan", stage, reuse=(Out, "a"), stale=lambda r: "it expired")
    assert again.value == 2 and not load_record(rec.path).stages["scan"].cached
    assert rec.last_result("scan", Out) == Out(value=1)  # the record on disk is the last run's


def test_a_failed_rerun_leaves_the_record_a_deployment_runs_from(tmp_path: Path) -> None:
    """Each run keeps its own record, unchanged once it ends; what a deployment starts a
    version from is the newest run that got through sign, not a later failed one."""
    from gantry.record import serving_record

    def ok(name: str) -> Callable[[], Out]:
        return lambda: Out(value=len(name))

    good = Recorder(tmp_path, SPEC, flow_run_id=None)
    for stage in ("weights", "build", "scan", "sign"):
        good.run_stage(stage, ok(stage))
    good.succeed()
    own = good.run_path
    before = own.read_bytes()

    failed = Recorder(tmp_path, SPEC, flow_run_id=None)
    with pytest.raises(RuntimeError):
        failed.run_stage("weights", lambda: (_ for _ in ()).throw(RuntimeError("hub down")))
    latest = load_record(failed.path)
    assert latest.stages["weights"].status == StageStatus.FAILED  # the latest is the failure
    assert own.read_bytes() == before  # the good run's own record did not change
    assert load_record(own).run_record == str(own)
    assert serving_record(tmp_path, SPEC.release_id) == own
    # A release that never got through sign: the latest record (reading it names the gap).
    assert serving_record(tmp_path / "none", "x-1") == tmp_path / "none" / "x-1.json"


def test_a_failure_while_cleaning_up_is_recorded_with_the_error(tmp_path: Path) -> None:
    """`_settle` notes a failed rollback on the canary's error: the record keeps both."""
    rec = Recorder(tmp_path, SPEC, flow_run_id=None)

    def canary() -> Out:
        exc = RuntimeError("a check failed")
        exc.add_note("and settling the canary failed: RouterError: router gone")
        raise exc

    with pytest.raises(RuntimeError):
        rec.run_stage("canary", canary)
    error = load_record(rec.path).stages["canary"].error
    assert error is not None and "settling the canary failed: RouterError" in error.message
