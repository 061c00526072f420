"""Release records shared between hosts through the multi topology's tracking server
(Debian's PostgreSQL and an MLflow server on it, both real): each "host" here is a state
dir of its own, and the first one's runs are killed for real (SIGKILL in a subprocess)
before its state dir is deleted, as when a worker host dies."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from gantry.adapters.mlflow_registry import MlflowRegistry
from gantry.errors import ConfigError, MLflowUnavailableError, is_transient
from gantry.record import Recorder, StageStatus, load_record, serving_record
from gantry.settings import Settings
from gantry.shared_records import (
    EXPERIMENT,
    HOST_TAG,
    RELEASE_TAG,
    STATUS_TAG,
    SharedRecords,
    shared_records,
)
from gantry.spec import ReleaseSpec, parse_spec
from tests.support import REPO_ROOT, free_port, tracking_server

pytestmark = pytest.mark.integration


class Out(BaseModel):
    value: str


@pytest.fixture(scope="module")
def tracking_url() -> Iterator[str]:
    with tracking_server() as url:
        yield url


def _spec(name: str) -> ReleaseSpec:
    return parse_spec({"name": name, "source": {"repo_id": "acme/m", "revision": "v1"}})


def _share(url: str, host: str) -> SharedRecords:
    return SharedRecords(MlflowRegistry(url, timeout_s=30), host=host)


def _dies_in_smoke(url: str, releases: Path, name: str) -> None:
    """Host A: weights, build, scan and sign succeed, then the process is SIGKILLed while
    smoke runs (nothing of it finishes)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pydantic import BaseModel
        from gantry.adapters.mlflow_registry import MlflowRegistry
        from gantry.record import Recorder
        from gantry.shared_records import SharedRecords
        from gantry.spec import ReleaseSpec, parse_spec

        class Out(BaseModel):
            value: str

        spec = parse_spec({{"name": {name!r}, "source": {{"repo_id": "acme/m", "revision": "v1"}}}})
        share = SharedRecords(MlflowRegistry({url!r}, timeout_s=30), host="host-a")
        rec = Recorder(__import__("pathlib").Path({str(releases)!r}), spec, flow_run_id=None,
                       shared=share)
        for stage in ("weights", "build", "sign"):
            rec.run_stage(stage, lambda: Out(value="a-" + stage))
        rec.run_stage("scan", lambda: Out(value="scanned-on-a"), reuse=(Out, "sha256:img"))
        rec.run_stage("smoke", lambda: os.kill(os.getpid(), signal.SIGKILL),
                      reuse=(Out, "served"))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_a_release_resumes_on_another_host_from_the_shared_record(
    tracking_url: str, tmp_path: Path
) -> None:
    host_a, host_b = tmp_path / "a" / "releases", tmp_path / "b" / "releases"
    _dies_in_smoke(tracking_url, host_a, "resumed")
    rid = _spec("resumed").release_id
    assert load_record(host_a / f"{rid}.json").stages["smoke"].status == StageStatus.RUNNING
    shutil.rmtree(tmp_path / "a")  # the host is gone, with everything it kept

    calls: list[str] = []

    def stage(name: str) -> Out:
        calls.append(name)
        return Out(value=f"b-{name}")

    rec = Recorder(host_b, _spec("resumed"), flow_run_id=None, shared=_share(tracking_url, "b"))
    # What host A finished on the same inputs is taken over; what it was killed in runs.
    scan = rec.run_stage("scan", lambda: stage("scan"), reuse=(Out, "sha256:img"))
    smoke = rec.run_stage("smoke", lambda: stage("smoke"), reuse=(Out, "served"))
    # Changed inputs are never re-used from anywhere.
    evaluate = rec.run_stage("evaluate", lambda: stage("evaluate"), reuse=(Out, "other"))
    rec.succeed()
    assert scan.value == "scanned-on-a" and calls == ["smoke", "evaluate"]
    assert smoke.value == "b-smoke" and evaluate.value == "b-evaluate"
    done = load_record(rec.path)
    assert done.stages["scan"].cached and not done.stages["smoke"].cached

    # Both runs are in the tracking server: A's as it was when it died, B's finished.
    registry = MlflowRegistry(tracking_url, timeout_s=30)
    exp = registry.ensure_experiment(EXPERIMENT)
    runs = registry.tagged_runs(exp, RELEASE_TAG, rid, limit=10)
    seen = [(r.data.tags[HOST_TAG], r.data.tags[STATUS_TAG], r.info.status) for r in runs]
    assert seen == [("b", "succeeded", "FINISHED"), ("host-a", "running", "RUNNING")]


def test_a_version_released_elsewhere_is_started_from_the_shared_record(
    tracking_url: str, tmp_path: Path
) -> None:
    host_a, host_b = tmp_path / "a" / "releases", tmp_path / "b" / "releases"
    _dies_in_smoke(tracking_url, host_a, "served-elsewhere")
    shutil.rmtree(tmp_path / "a")

    share = _share(tracking_url, "b")
    rid = _spec("served-elsewhere").release_id
    assert serving_record(host_b, rid) == host_b / f"{rid}.json"
    path = serving_record(host_b, rid, share)
    kept = load_record(path)
    assert path.parent == host_b / "history" and kept.run_record == str(path)
    assert kept.stages["sign"].result == {"value": "a-sign"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # Kept on this host now: found again without asking the server.
    assert serving_record(host_b, rid) == path


def test_the_newest_run_wins_whichever_host_ran_it(tracking_url: str, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a" / "releases", tmp_path / "b" / "releases"
    share_a, share_b = _share(tracking_url, "a"), _share(tracking_url, "b")
    spec = _spec("newest")
    first = Recorder(host_a, spec, flow_run_id=None, shared=share_a)
    first.run_stage("scan", lambda: Out(value="a-1"), reuse=(Out, "k"))
    first.succeed()
    second = Recorder(host_b, spec, flow_run_id=None, shared=share_b)
    # B's scan ran again (its inputs changed), so A's result of "k" is no longer the last.
    second.run_stage("scan", lambda: Out(value="b-2"), reuse=(Out, "k2"))
    second.succeed()
    third = Recorder(host_a, spec, flow_run_id=None, shared=share_a)
    assert third.run_stage("scan", lambda: Out(value="a-3"), reuse=(Out, "k2")).value == "b-2"
    assert third.last_result("scan", Out) == Out(value="b-2")
    # A run's file that was never kept reads as absent, not as an error.
    (run, *_) = share_a.runs(spec.release_id, limit=5)
    assert share_a.registry.read_text(run.mlflow_run_id, "files/none.sig.json") is None


def test_an_unreachable_share_costs_only_reuse_until_a_version_must_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    rec = Recorder(tmp_path, _spec("offline"), flow_run_id=None, shared=_share(dead, "a"))
    with caplog.at_level(logging.WARNING, logger="gantry.record"):
        out = rec.run_stage("scan", lambda: Out(value="x"), reuse=(Out, "k"))
    assert out.value == "x"
    assert "could not be written to" in caplog.text and dead in caplog.text
    assert load_record(rec.path).stages["scan"].status == StageStatus.SUCCEEDED

    called: list[int] = []

    def canary() -> Out:
        called.append(1)
        return Out(value="y")

    with pytest.raises(MLflowUnavailableError) as info:
        rec.run_stage("canary", canary, shared_first=True)
    assert not called and is_transient(info.value)
    failed = load_record(rec.path)
    assert failed.stages["canary"].status == StageStatus.FAILED
    assert failed.stages["canary"].error is not None and failed.stages["canary"].error.transient


def test_multi_topology_refuses_a_tracking_store_other_hosts_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path), "GANTRY_TOPOLOGY": "multi"})
    single = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    assert shared_records(single) is None
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as info:
        shared_records(settings)
    assert os.fspath(tmp_path) in str(info.value)
    # The embedded server (no MLFLOW_TRACKING_URI) is one every host can reach.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    share = shared_records(settings)
    assert share is not None and share.where == settings.mlflow_server_url
