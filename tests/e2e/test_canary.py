"""The canary end to end, through `gantry release` / `gantry rollback` on the real engine:
a first champion, a good candidate promoted, the degraded variant rolled back, all under a
steady load from a separate process that must see zero failed requests; a candidate that
crashes mid-canary; a release killed mid-canary and then rolled back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from tests.support import REPO_ROOT, GantryEnv, GantryProcess, SteadyLoad, embedded_prefect
from tests.support import gantry_popen as _popen
from tests.support import gantry_release as _release

pytestmark = pytest.mark.e2e

MODEL = "minilm-canary-e2e"
#: Short windows: the test proves the mechanics, not a production observation time.
CANARY = {
    "window_s": 5,
    "interval_s": 0.5,
    "min_requests": 10,
    "probe_rps": 10,
    "keep_warm_s": 3,
    "drain_s": 10,
    # These machines are shared: a 5 s window of a neighbour's build can make either
    # version look slow. The latency check is judged in tests/unit/test_canary_pure.py;
    # here it must not decide.
    "max_latency_ratio": 100,
    "latency_slack_ms": 60_000,
}


@pytest.fixture(scope="module")
def env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    with embedded_prefect(gantry_env, remove_deployments=True) as (env, _settings):
        yield env


def _spec(tmp_path: Path, name: str, revision: str, **canary: Any) -> Path:
    data = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
    data["source"]["revision"] = revision
    # Every tenth pair of the demo set (the same file for every spec, so the same release
    # id): the evaluate stage and the quality probes in a fraction of the time.
    subset = tmp_path.parent / "eval-subset.jsonl"
    if not subset.exists():
        lines = (REPO_ROOT / data["evaluate"]["dataset"]).read_text().splitlines()
        subset.write_text("\n".join(lines[::10]) + "\n")
    data["evaluate"]["dataset"] = str(subset)
    data["mlflow"] = {"model_name": MODEL}
    data["canary"] = {**CANARY, **canary}
    if revision == "degraded":  # its eval gate relaxed, as in examples/minilm-degraded.yaml
        data["evaluate"].update(threshold=0.2, tolerance=1.0)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _status(gantry_env: GantryEnv) -> dict[str, Any]:
    (path,) = (gantry_env.state_dir / "deployments").glob(f"gantry-{MODEL}-*/status.json")
    return dict(json.loads(path.read_text()))


def _champion_alias(gantry_env: GantryEnv) -> str | None:
    from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry

    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    ref = MlflowRegistry(uri, timeout_s=60).get_alias_version(MODEL, CHAMPION)
    return None if ref is None else ref.version


def _version_tags(gantry_env: GantryEnv, version: str) -> dict[str, str]:
    from gantry.adapters.mlflow_registry import MlflowRegistry

    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    return dict(MlflowRegistry(uri, timeout_s=60).get_version(MODEL, version).tags)


def _containers() -> dict[str, str]:
    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": f"ai.gantry.model={MODEL}"})
        return {c.name: c.status for c in found}
    finally:
        client.close()


def _weights(gantry_env: GantryEnv) -> dict[str, int]:
    from gantry.adapters.haproxy import RuntimeAPI
    from gantry.deploy.docker import admin_socket_of

    client = docker.from_env()
    try:
        (router,) = client.containers.list(
            filters={"label": [f"ai.gantry.model={MODEL}", "ai.gantry.role=router"]}
        )
        path = admin_socket_of(router.attrs)
    finally:
        client.close()
    assert path is not None, "the router has no runtime API socket mounted"
    return RuntimeAPI(path).weights()


def _wait_phase(
    gantry_env: GantryEnv, proc: GantryProcess, phase: str, timeout: float = 600
) -> dict[str, Any]:
    """The status once the canary is in ``phase``; the release's own output if it ends first
    (waiting out the timeout would hide why)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = _status(gantry_env)
            if st.get("canary") and st["canary"]["phase"] == phase and st.get("candidate"):
                return st
        except (ValueError, FileNotFoundError):
            pass
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"the release ended (exit {proc.returncode}) before the canary reached phase "
                f"{phase}:\n{out[-2000:]}\n{err[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"the canary never reached phase {phase}:\n{proc.output()[1][-4000:]}")
        time.sleep(0.2)


def test_first_deploy_then_promotion_then_rollback_without_a_failed_request(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    rc, first, err = _release(env, _spec(tmp_path, "v1", "v1"))
    assert rc == 0, err[-3000:]
    canary = first["stages"]["canary"]["result"]
    assert canary["outcome"] == "deployed" and canary["previous_version"] is None
    v1 = canary["version"]
    assert _champion_alias(gantry_env) == v1
    endpoint = canary["endpoint"]

    load = SteadyLoad(endpoint, tmp_path / "load.json")
    try:
        rc, good, err = _release(env, _spec(tmp_path, "v2", "v2"))
        assert rc == 0, err[-3000:]
        promoted = good["stages"]["canary"]["result"]
        v2 = promoted["version"]
        assert promoted["outcome"] == "promoted" and promoted["previous_version"] == v1
        assert [v["weight"] for v in promoted["verdicts"]] == [10, 50]
        assert all(v["passed"] for v in promoted["verdicts"])
        # Decided from Prometheus (the default): every traffic and quality check read its
        # PromQL, and the candidate's usage over each window was measured there.
        for v in promoted["verdicts"]:
            assert v["source"] == "prometheus", v
            checks = {c["name"]: c for c in v["checks"]}
            assert 'outcome="failure"' in checks["success-rate"]["queries"][0]
            assert "gantry_canary_quality_score" in checks["quality"]["queries"][0]
            assert v["usage"]["memory_p99_mb"] > 10, v["usage"]
        assert promoted["endpoint"] == endpoint  # the model's address never moves
        assert _champion_alias(gantry_env) == v2
        assert _version_tags(gantry_env, v1)["gantry.superseded_by"] == v2
        assert _version_tags(gantry_env, v2)["gantry.canary.outcome"] == "promoted"
        assert promoted["previous_removed"]  # kept warm keep_warm_s, then removed

        rc, bad, err = _release(env, _spec(tmp_path, "degraded", "degraded"))
        assert rc == 1
        stage = bad["stages"]["canary"]
        assert stage["status"] == "failed" and stage["error"]["type"] == "CanaryFailedError"
        assert "quality" in stage["error"]["message"]
        assert "[query: max(gantry_canary_quality_score{" in stage["error"]["message"]
        assert _champion_alias(gantry_env) == v2  # untouched by the rollback
    finally:
        summary = load.stop()
    assert summary["sent"] > 100 and summary["failed"] == 0, summary["failures"][:5]

    status = _status(gantry_env)
    assert status["champion"]["version"] == v2 and status["candidate"] is None
    assert status["canary"]["phase"] == "rolled-back"
    bad_version = status["canary"]["candidate_version"]
    tags = _version_tags(gantry_env, bad_version)
    assert tags["gantry.canary.outcome"] == "rolled-back"
    # The failing query, with its value, is on the rolled-back version in MLflow.
    assert tags["gantry.canary.metrics"] == "prometheus"
    failing = [q for q in json.loads(tags["gantry.canary.queries"]) if q["check"] == "quality"]
    assert failing and "gantry_canary_quality_score" in failing[0]["queries"][0], failing
    (verdict,) = status["canary"]["verdicts"]
    quality = next(c for c in verdict["checks"] if c["name"] == "quality")
    assert quality["passed"] is False and quality["observed"] < quality["limit"], quality
    champ_slot = status["champion"]["slot"]
    assert _weights(gantry_env)[champ_slot] == 100
    running = _containers()
    assert len(running) == 2 and all(s == "running" for s in running.values()), running
    rolled = _events(env, "gantry.canary.rolled-back")
    assert any(e["payload"].get("version") == bad_version for e in rolled), rolled
    assert any(e["payload"].get("version") == v2 for e in _events(env, "gantry.canary.promoted"))


def _events(env: dict[str, str], name: str) -> list[dict[str, Any]]:
    """Events of this test's model named ``name``, from the Prefect server's event API
    (they are sent asynchronously: wait a little for them)."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(
            f"{env['PREFECT_API_URL']}/events/filter",
            json={"filter": {"event": {"name": [name]}}, "limit": 50},
            timeout=30,
        )
        r.raise_for_status()
        found = [
            e
            for e in r.json()["events"]
            if e["resource"]["prefect.resource.id"] == f"gantry.model.{MODEL}"
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_a_candidate_that_crashes_is_rolled_back_at_once(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    before = _champion_alias(gantry_env)
    assert before is not None, "runs after the promotion test"
    endpoint = _status(gantry_env)["champion"] and _endpoint(gantry_env)
    load = SteadyLoad(endpoint, tmp_path / "load.json")
    try:
        proc = _popen(env, "release", str(_spec(tmp_path, "again", "v1", window_s=120)))
        st = _wait_phase(gantry_env, proc, "progressing")
        name = next(n for n in _containers() if n.endswith(f"-{st['candidate']['slot']}"))
        client = docker.from_env()
        killed_at = time.time()
        client.containers.get(name).kill()
        client.close()
        out, err = proc.communicate(timeout=120)
        ended = time.time()
    finally:
        summary = load.stop()
    assert proc.returncode == 1, err[-3000:]
    assert ended - killed_at < 60, "it waited for the 120 s window instead of rolling back"
    record = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert "health" in record["stages"]["canary"]["error"]["message"]
    canary = _status(gantry_env)["canary"]
    # Long before the window would have ended (bench/canary.py measures how long it takes).
    weight_zero = datetime.fromisoformat(canary["weight_zero_at"]).timestamp()
    assert weight_zero - killed_at < 60
    # A request whose answer the candidate had begun to send when it was killed cannot be
    # retried on the champion by any proxy; every other request must succeed.
    at_kill = [f for f in summary["failures"] if abs(load.started + f["at_s"] - killed_at) < 5]
    assert len(at_kill) == summary["failed"] <= 2, summary["failures"][:5]
    assert _champion_alias(gantry_env) == before
    assert len(_containers()) == 2


def _endpoint(gantry_env: GantryEnv) -> str:
    return f"http://127.0.0.1:{_status(gantry_env)['port']}"


def test_killed_mid_canary_then_rollback_leaves_the_champion_at_100(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    before = _champion_alias(gantry_env)
    # The same spec as the crash test: its earlier stages are re-used, the canary runs.
    proc = _popen(env, "release", str(_spec(tmp_path, "again", "v1", window_s=120)))
    st = _wait_phase(gantry_env, proc, "progressing")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert len(_containers()) == 3  # router, champion, the abandoned candidate

    rb = _popen(env, "rollback", MODEL)
    out, err = rb.communicate(timeout=300)
    assert rb.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["action"] == "aborted-canary"
    assert result["removed_version"] == st["candidate"]["version"]
    status = _status(gantry_env)
    assert status["canary"]["phase"] == "rolled-back" and status["candidate"] is None
    assert _weights(gantry_env)[status["champion"]["slot"]] == 100
    assert _weights(gantry_env)[st["candidate"]["slot"]] == 0
    assert len(_containers()) == 2
    assert _champion_alias(gantry_env) == before

    # With no canary left, a rollback goes one version back: the champion before the
    # promotion, started again from its release record (it is no longer kept warm).
    promoted = status["champion"]["version"]
    previous = status["previous"]["version"]
    again = _popen(env, "rollback", MODEL)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["action"] == "restored-previous" and result["removed_version"] == promoted
    assert _champion_alias(gantry_env) == previous
    assert _status(gantry_env)["champion"]["version"] == previous
    assert len(_containers()) == 2

    last = _popen(env, "rollback", MODEL)
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0 and json.loads(out)["action"] == "nothing-to-do"

    # A damaged status file: the rollback keeps it aside and rebuilds the status from the
    # running containers' labels and MLflow's champion alias.
    status_file = next((gantry_env.state_dir / "deployments").glob(f"gantry-{MODEL}-*/status.json"))
    status_file.write_text('{"model": "truncated')
    mended = _popen(env, "rollback", MODEL)
    out, err = mended.communicate(timeout=300)
    assert mended.returncode == 0, err[-3000:]
    assert json.loads(out)["action"] == "nothing-to-do"
    assert _status(gantry_env)["champion"]["version"] == previous
    (kept,) = status_file.parent.glob("status.json.unreadable-*")
    assert kept.read_text() == '{"model": "truncated'

    # A champion whose container died: a canary refuses to compare against it (the
    # release fails naming the fix), and `gantry rollback` starts it again at 100 %.
    champ = _status(gantry_env)["champion"]
    client = docker.from_env()
    name = next(n for n in _containers() if n.endswith(f"-{champ['slot']}"))
    client.containers.get(name).kill()
    client.close()
    proc = _popen(env, "release", str(_spec(tmp_path, "again", "v1", window_s=120)))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    error = json.loads(Path(out.strip().splitlines()[-1]).read_text())["stages"]["canary"]
    assert error["error"]["type"] == "ChampionUnavailableError"
    assert "gantry rollback" in error["error"]["message"]
    restored = _popen(env, "rollback", MODEL)
    out, err = restored.communicate(timeout=300)
    assert restored.returncode == 0, err[-3000:]
    assert json.loads(out)["action"] == "restored-champion"
    assert _containers()[name] == "running" and _weights(gantry_env)[champ["slot"]] == 100


def test_manual_approval_pauses_the_flow_run_before_100(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    from gantry.spec import load_spec

    spec = _spec(tmp_path, "approval", "v2", manual_approval=True, approval_timeout_s=300)
    release_id = load_spec(spec).release_id
    proc = _popen(env, "release", str(spec))
    try:
        _wait_phase(gantry_env, proc, "waiting-approval")
        record = json.loads((gantry_env.state_dir / "releases" / f"{release_id}.json").read_text())
        # What a person does in the UI's resume form, through Prefect's own client.
        resume = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, uuid\n"
                "from prefect.flow_runs import resume_flow_run\n"
                "resume_flow_run(uuid.UUID(sys.argv[1]), "
                "run_input={'approve': True, 'comment': 'looks good'})",
                record["flow_run_id"],
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert resume.returncode == 0, resume.stderr[-2000:]
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(Path(out.strip().splitlines()[-1]).read_text())["stages"]["canary"]
    assert result["result"]["outcome"] == "promoted"
    assert _champion_alias(gantry_env) == result["result"]["version"]
