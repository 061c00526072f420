"""Releases across worker hosts that are containers (`gantry topology up --workers 2`).

A control container (Prefect server, PostgreSQL + MLflow server, registry, Hub endpoint,
webhook receiver) and two worker containers on a private network, each worker a Prefect
process worker with its own address and state dir, building and serving through the
machine's Docker engine. Releases are started the way CI starts them: a signed webhook
delivery. The tests kill a worker (`docker kill`) and cut one off the network
(`docker network disconnect`) while it runs a release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from gantry.adapters.containers import RELEASE_LABEL, STAGE_LABEL
from gantry.adapters.mlflow_registry import CHAMPION, RELEASE_TAG, MlflowRegistry
from gantry.localenv.topology import Topology, load_topology
from gantry.record import StageStatus, load_record
from gantry.spec import load_spec
from tests.reliability.conftest import Scenario, busy_demo_spec
from tests.support import REPO_ROOT, SHARED_CACHE, gantry_cli

pytestmark = pytest.mark.reliability

NAME = "gantry-topo-test"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Topo:
    t: Topology
    env: dict[str, str]
    specs: Path

    @property
    def api(self) -> str:
        return f"{self.t.prefect_url}/api"

    def worker_state(self, host: str) -> Path:
        return self.t.state_dir(host)


def _port_base() -> int:
    """Six free consecutive ports below the engine's range."""
    import socket

    for base in range(5270, 9000, 10):
        try:
            for p in range(base, base + 6):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise AssertionError("no six free ports")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    # The control host's PostgreSQL runs as `postgres`, which must enter every directory
    # above its cluster: not pytest's 0700 tmp dirs.
    base = Path(tempfile.mkdtemp(prefix="gantry-topology-"))
    base.chmod(0o755)
    state, specs = base / "state", base / "specs"
    specs.mkdir()
    env = {
        **os.environ,
        "GANTRY_STATE_DIR": str(state),
        # The image's wheels and base images' root filesystems, shared with the session.
        "GANTRY_CACHE_DIR": str(SHARED_CACHE),
        "PYTHONUNBUFFERED": "1",
    }
    up = gantry_cli(
        env,
        "topology",
        "up",
        "--workers",
        "2",
        "--name",
        NAME,
        "--port-base",
        str(_port_base()),
        "--spec-root",
        str(specs),
        timeout=2400,
    )
    t = load_topology(state / "topology")
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        assert t is not None
        yield Topo(t=t, env=env, specs=specs)
    finally:
        down = gantry_cli(env, "topology", "down", "--purge", timeout=600)
        shutil.rmtree(base, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-3000:]


def _spec(topo: Topo, model: str, revision: str) -> Path:
    data = busy_demo_spec(topo.specs, model, revision)
    path = topo.specs / f"{model}-{revision}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _deliver(topo: Topo, spec: Path, delivery: str) -> str:
    """A signed webhook delivery; the flow run's id."""
    r = gantry_cli(topo.env, "topology", "deliver", str(spec), "--delivery", delivery, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    body = json.loads(r.stdout)
    return str(body["flow_run_id"])


def _flow_run(topo: Topo, run_id: str) -> dict[str, Any]:
    r = httpx.get(f"{topo.api}/flow_runs/{run_id}", timeout=30)
    r.raise_for_status()
    return dict(r.json())


def _state(run: dict[str, Any]) -> str:
    return str((run.get("state") or {}).get("type") or "")


def _ran_on(topo: Topo, release_id: str, status: StageStatus | None = None) -> list[str]:
    """The worker hosts with a record of the release (in ``status``, if given)."""
    hosts = []
    for host in topo.t.worker_roles():
        rec = _record(topo, host, release_id)
        if rec is not None and (status is None or rec.status == status):
            hosts.append(host)
    return hosts


def _wait_final(topo: Topo, run_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    runs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        runs = {rid: _flow_run(topo, rid) for rid in run_ids}
        if all(_state(r) in FINAL for r in runs.values()):
            return runs
        time.sleep(5)
    raise AssertionError(
        "runs not final: " + ", ".join(f"{r['name']} {_state(r)}" for r in runs.values())
    )


def _record(topo: Topo, host: str, release_id: str) -> Any:
    path = topo.worker_state(host) / "releases" / f"{release_id}.json"
    return load_record(path) if path.is_file() else None


def _wait_stage(topo: Topo, run_id: str, release_id: str, stage: str, timeout_s: float) -> str:
    """The worker host once ``stage`` of the release runs there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = _flow_run(topo, run_id)
        assert _state(run) not in FINAL, f"{run['name']} ended {_state(run)} before {stage}"
        for host in _ran_on(topo, release_id):
            rec = _record(topo, host, release_id)
            if stage in rec.stages and rec.stages[stage].status == StageStatus.RUNNING:
                return host
        time.sleep(0.5)
    raise AssertionError(f"stage {stage} of {release_id} never ran")


def _task_runs(topo: Topo, run_id: str) -> dict[str, int]:
    """Task name → how many times it ran in the flow run (retries count)."""
    r = httpx.post(
        f"{topo.api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "offset": 0, "limit": 200},
        timeout=30,
    )
    r.raise_for_status()
    return {t["task_key"].split("-")[0] or t["name"]: int(t["run_count"]) for t in r.json()}


def _canaries(deployments: Path, model: str) -> list[tuple[float, float, str]]:
    (dep,) = deployments.glob(f"gantry-{model}-*")
    out = []
    for path in (dep / "history").glob("*.json"):
        c = json.loads(path.read_text())
        out.append(
            (
                datetime.fromisoformat(c["started_at"]).timestamp(),
                datetime.fromisoformat(c["decided_at"]).timestamp(),
                c["phase"],
            )
        )
    return sorted(out)


def _registry(topo: Topo) -> MlflowRegistry:
    return MlflowRegistry(f"http://127.0.0.1:{topo.t.ports.mlflow}", timeout_s=60)


def _one_champion_version(topo: Topo, model: str, release_id: str) -> str:
    registry = _registry(topo)
    versions = registry.client.search_model_versions(
        f"name = '{model}' and tags.`{RELEASE_TAG}` = '{release_id}'"
    )
    assert len(versions) == 1, [v.version for v in versions]
    champion = registry.get_alias_version(model, CHAMPION)
    assert champion is not None and champion.version == versions[0].version
    return str(versions[0].version)


def _serves(endpoint: str, model: str) -> None:
    answer = httpx.post(
        f"{endpoint}/v1/embeddings", json={"model": model, "input": ["serving"]}, timeout=30
    )
    assert answer.status_code == 200, answer.text[:500]


def test_webhook_releases_spread_over_two_workers_and_one_models_canaries_take_turns(
    topo: Topo, scenario: Scenario
) -> None:
    scenario.group = "hosts: containers"
    scenario.title = (
        "three webhook deliveries, two models, at once, to a topology of two worker containers"
    )
    specs = [_spec(topo, "topo-a", "v1"), _spec(topo, "topo-b", "v1"), _spec(topo, "topo-a", "v2")]
    t0 = time.monotonic()
    run_ids = [_deliver(topo, s, f"spread-{i}") for i, s in enumerate(specs)]
    runs = _wait_final(topo, run_ids, timeout_s=1500)
    took = time.monotonic() - t0
    assert [_state(r) for r in runs.values()] == ["COMPLETED"] * 3, [
        (r["name"], _state(r), (r.get("state") or {}).get("message")) for r in runs.values()
    ]
    ran_on = {
        spec.name: _ran_on(topo, load_spec(spec).release_id, StageStatus.SUCCEEDED)
        for spec in specs
    }
    hosts = sorted({h for on in ran_on.values() for h in on})
    assert all(len(on) == 1 for on in ran_on.values()), ran_on
    assert hosts == ["worker-1", "worker-2"], ran_on
    canaries = _canaries(topo.t.deployments_dir, "topo-a")
    assert len(canaries) == 2
    (_, d1, _), (s2, _, _) = canaries
    assert d1 <= s2, "two canaries of topo-a ran at once"
    for spec in specs[1:]:
        release_id = load_spec(spec).release_id
        _one_champion_version(topo, load_spec(spec).name, release_id)
    scenario.outcome = (
        f"all three completed in {took:.0f}s, on {' and '.join(hosts)}; topo-a's two "
        "canaries one after the other; one MLflow version each, the champions serve"
    )


def _kill_during(
    topo: Topo, client: Any, spec: Path, stage: str, delivery: str
) -> tuple[str, str, float]:
    """Deliver ``spec``, kill the worker container running it once ``stage`` runs, and
    wait until Prefect marks the run crashed; (host, run id, seconds from kill to crash)."""
    release_id = load_spec(spec).release_id
    run_id = _deliver(topo, spec, delivery)
    host = _wait_stage(topo, run_id, release_id, stage, timeout_s=900)
    client.containers.get(topo.t.container(host)).kill()
    killed = time.monotonic()
    run = _wait_final(topo, [run_id], timeout_s=300)[run_id]
    assert _state(run) == "CRASHED", _state(run)
    return host, run_id, time.monotonic() - killed


def _redeliver(topo: Topo, spec: Path, delivery: str, dead: str) -> str:
    """Deliver ``spec`` again; the run id once a worker other than ``dead`` runs it."""
    release_id = load_spec(spec).release_id
    run_id = _deliver(topo, spec, delivery)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        run = _flow_run(topo, run_id)
        assert _state(run) not in FINAL, (run.get("state") or {}).get("message")
        started = _state(run) == "RUNNING"
        if started and [h for h in _ran_on(topo, release_id) if h != dead]:
            return run_id
        time.sleep(0.5)
    raise AssertionError(f"no live worker took {release_id} again")


def _resumed(topo: Topo, client: Any, spec: Path, run_id: str, dead: str) -> list[str]:
    """The re-delivered run completes on another worker than ``dead``, with one MLflow
    version, the champion serving and no container of the killed run left; the stages it
    took from the shared record."""
    release_id = load_spec(spec).release_id
    run = _wait_final(topo, [run_id], timeout_s=900)[run_id]
    assert _state(run) == "COMPLETED", (run.get("state") or {}).get("message")
    (other,) = _ran_on(topo, release_id, StageStatus.SUCCEEDED)
    assert other != dead
    record = _record(topo, other, release_id)
    _one_champion_version(topo, load_spec(spec).name, release_id)
    _serves(str((record.stages["canary"].result or {})["endpoint"]), load_spec(spec).name)
    left = [
        c.name
        for c in client.containers.list(
            all=True, filters={"label": [f"{RELEASE_LABEL}={release_id}"]}
        )
        if c.labels.get(STAGE_LABEL) != "deploy"
    ]
    assert left == [], left
    return [s for s, st in record.stages.items() if st.cached]


def test_a_worker_killed_mid_build_or_mid_canary_is_crashed_and_the_release_resumes_elsewhere(
    topo: Topo, scenario: Scenario
) -> None:
    scenario.group = "hosts: containers"
    scenario.title = (
        "the worker container running a release is killed (`docker kill`) mid-build, then "
        "another mid-canary; each release delivered again"
    )
    client = docker.from_env(timeout=120)
    # A model no release built yet: its build stage builds (from the engine's layer
    # cache) and pushes a new repository, seconds to be caught in.
    build_spec = _spec(topo, "topo-c", "v1")
    canary_spec = _spec(topo, "topo-b", "v2")
    dead, _, crash_1 = _kill_during(topo, client, build_spec, "build", "kill-build-1")
    resumed = _redeliver(topo, build_spec, "kill-build-2", dead)
    # The dead host comes back while the release resumes on the other (`up` keeps what
    # runs); the canary release then lands on whichever worker is free.
    restart = subprocess.Popen(
        [sys.executable, "-m", "gantry.cli", "topology", "up", "--workers", "2"],
        env=topo.env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    cached_build = _resumed(topo, client, build_spec, resumed, dead)
    assert restart.wait(timeout=900) == 0, (restart.stderr.read() if restart.stderr else "")[-3000:]
    assert "build" not in cached_build, cached_build
    dead_2, _, crash_2 = _kill_during(topo, client, canary_spec, "canary", "kill-canary-1")
    cached_canary = _resumed(
        topo, client, canary_spec, _redeliver(topo, canary_spec, "kill-canary-2", dead_2), dead_2
    )
    for stage in ("build", "smoke", "evaluate", "register"):
        assert stage in cached_canary, (stage, cached_canary)
    assert "canary" not in cached_canary
    scenario.outcome = (
        f"crashed {crash_1:.0f}s / {crash_2:.0f}s after the kills; delivered again, each "
        f"resumed on the other worker (after the build kill {', '.join(cached_build)} "
        f"cached; after the canary kill {', '.join(cached_canary)}); one MLflow version "
        "each, the champions serve, no orphans; `topology up` restarted the first dead "
        "worker meanwhile"
    )
    client.close()


def test_a_worker_cut_off_mid_evaluate_fails_transient_retries_and_registers_once(
    topo: Topo, scenario: Scenario
) -> None:
    scenario.group = "hosts: containers"
    scenario.title = "the worker running a release is disconnected from the network mid-evaluate"
    spec = _spec(topo, "topo-a", "main")
    release_id = load_spec(spec).release_id
    client = docker.from_env(timeout=120)
    run_id = _deliver(topo, spec, "partition-1")
    host = _wait_stage(topo, run_id, release_id, "evaluate", timeout_s=900)
    network = client.networks.get(topo.t.network)
    container = client.containers.get(topo.t.container(host))
    network.disconnect(container)
    time.sleep(20)
    network.connect(container, aliases=[host])
    run = _wait_final(topo, [run_id], timeout_s=900)[run_id]
    assert _state(run) == "COMPLETED", (run.get("state") or {}).get("message")
    assert _ran_on(topo, release_id) == [host]
    runs = _task_runs(topo, run_id)
    # The stage cut off failed as transient and ran again; nothing after it twice.
    assert runs["evaluate_task"] >= 2 and runs["register_task"] == 1, runs
    record = _record(topo, host, release_id)
    assert record.status == StageStatus.SUCCEEDED
    _one_champion_version(topo, "topo-a", release_id)
    scenario.outcome = (
        f"{host} cut off for 20s mid-evaluate: evaluate failed as transient and ran "
        f"{runs['evaluate_task']} times, register once; the run completed there; one MLflow "
        "version, the champion serves"
    )
    _serves(str((record.stages["canary"].result or {})["endpoint"]), "topo-a")
    client.close()
