"""`gantry release` SIGKILLed mid-stage and at a stage boundary, again and again, then run
to the end.

One release is killed at each point in turn (mid-weights, mid-build, just after build,
mid-smoke, mid-evaluate, mid-register, mid-canary): every run resumes what the run before it was
killed in, and is itself killed further on; the last run finishes. So each kill is
followed by a run that must resume past it (the stages finished before the kill are
``cached``, what the kill left behind is cleaned up as the stage is run again) and the
recovery itself is crash-tested. The killed runs are real CLI processes: their whole
process group (trivy and any other child) dies at once, with nothing flushed or cleaned.
At the end there must be exactly one MLflow run and model version for the release, one
pushed build tag, no container of the release other than its deployment, no scratch or
temp file, one network and router whose weights put the champion at 100 %, and the release
must verify.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from gantry.adapters.containers import RELEASE_LABEL, STAGE_LABEL
from gantry.adapters.mlflow_registry import RELEASE_TAG, MlflowRegistry
from gantry.adapters.registry import RegistryClient
from gantry.errors import GantryError
from gantry.record import STAGES, ReleaseRecord, StageStatus, load_record
from gantry.settings import Settings
from gantry.spec import load_spec
from gantry.verify import verify_release
from tests.reliability.conftest import HubFaults, Scenario
from tests.support import REPO_ROOT, GantryEnv, PrefectServer

pytestmark = pytest.mark.reliability


@dataclass
class CrashEnv:
    state: Path
    env: dict[str, str]
    registry: str
    eval_set: Path
    docker: docker.DockerClient

    def spec(self, name: str) -> Path:
        data = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
        data["name"] = name
        data["evaluate"]["dataset"] = str(self.eval_set)
        path = self.state.parent / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def containers(self, release_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        """The release's containers as `docker ps -a` lists them (one call: no container
        can vanish between listing and inspecting it)."""
        labels = [f"{RELEASE_LABEL}={release_id}"] + ([f"{STAGE_LABEL}={stage}"] if stage else [])
        return list(self.docker.api.containers(all=True, filters={"label": labels}))

    def remove_deployments(self) -> None:
        """The live deployments the canary stage leaves by design (one per point)."""
        from gantry.deploy.docker import remove_deployments

        remove_deployments(self.docker, Settings.from_env(self.env).deployments_dir)


@pytest.fixture(scope="module")
def crash_env(
    gantry_env: GantryEnv, prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrashEnv]:
    """A state dir of its own (so the first point finds an empty weights cache) on the
    session's registry, hub endpoint and Prefect server."""
    root = tmp_path_factory.mktemp("crash")
    state = root / "state"
    # One pair in 20 of the demo set: every topic, a twentieth of the evaluation time.
    lines = (REPO_ROOT / "examples/eval/minilm-retrieval.jsonl").read_text().splitlines()
    eval_set = root / "eval.jsonl"
    eval_set.write_text("\n".join(lines[::20]) + "\n")
    env = {
        **os.environ,
        **gantry_env.env,
        **prefect_server.env(),
        "GANTRY_STATE_DIR": str(state),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_HOME", None)
    client = docker.from_env(timeout=120)
    try:
        yield CrashEnv(state, env, gantry_env.registry, eval_set, client)
    finally:
        client.close()


def _record(path: Path) -> ReleaseRecord | None:
    try:
        return load_record(path)
    except (FileNotFoundError, ValueError):
        return None


def _status(rec: ReleaseRecord | None, stage: str) -> StageStatus | None:
    return rec.stages[stage].status if rec else None


@dataclass(frozen=True)
class Point:
    """Where to kill: ``stage`` is ``running`` (mid) or has just ``succeeded`` (boundary)."""

    stage: str
    boundary: bool
    title: str
    #: Extra condition, checked once the stage is running, for a kill deep inside it.
    ready: Callable[[CrashEnv, str, float], bool] = lambda env, release_id, since: True


def _scratch(env: CrashEnv, where: str, prefix: str) -> bool:
    d = env.state / where
    return d.is_dir() and any(p.name.startswith(prefix) for p in d.iterdir())


def _running(env: CrashEnv, release_id: str, stage: str) -> bool:
    return any(c["State"] == "running" for c in env.containers(release_id, stage))


def _mlflow_run_created(env: CrashEnv, release_id: str) -> bool:
    """Whether the release's MLflow run exists yet (read straight from the SQLite store,
    so the kill can land between the run and the model version)."""
    db = env.state / "mlflow" / "mlflow.db"
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
            row = c.execute(
                "SELECT 1 FROM tags WHERE key = ? AND value = ? LIMIT 1", (RELEASE_TAG, release_id)
            ).fetchone()
    except sqlite3.Error:
        return False  # not created yet, or busy: look again
    return row is not None


POINTS = {
    "mid-weights": Point(
        "weights",
        False,
        "killed mid-download of the weights (the model file stalled by the hub)",
        lambda env, rid, since: _scratch(env, "weights/tmp", "snap-"),
    ),
    "mid-build": Point(
        "build",
        False,
        "killed mid-build (context assembled, `docker build` under way)",
        lambda env, rid, since: _scratch(env, "build", "ctx-") and time.monotonic() - since > 1.5,
    ),
    "after-build": Point("build", True, "killed just after build succeeded"),
    "mid-smoke": Point(
        "smoke",
        False,
        "killed mid-smoke (hardened container running)",
        lambda env, rid, since: _running(env, rid, "smoke"),
    ),
    "mid-evaluate": Point(
        "evaluate",
        False,
        "killed mid-evaluate (container serving the eval set)",
        lambda env, rid, since: _running(env, rid, "evaluate"),
    ),
    "mid-register": Point(
        "register",
        False,
        "killed mid-register (the release's MLflow run created, the version not yet)",
        lambda env, rid, since: _mlflow_run_created(env, rid),
    ),
    "mid-canary": Point(
        "canary",
        False,
        "killed mid-canary (router up, the new version's server started, no traffic yet)",
        lambda env, rid, since: _running(env, rid, "deploy"),
    ),
}


def _release(
    env: CrashEnv, spec: Path, log: Path, *, cold_build: bool = False
) -> subprocess.Popen[bytes]:
    # A cold build (no layer cache) for the mid-build point: earlier tests of the session
    # may have left every layer cached, and a build of a second would end before the kill.
    extra = {"GANTRY_BUILD_NO_CACHE": "1"} if cold_build else {}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gantry.cli", "release", str(spec)],
            env={**env.env, **extra},
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes every child
        )


def _kill_at(
    env: CrashEnv, proc: subprocess.Popen[bytes], path: Path, point: Point, release_id: str
) -> ReleaseRecord:
    """SIGKILL the release's process group at ``point``; the record as the kill left it."""
    deadline = time.monotonic() + 600
    running_since: float | None = None
    while time.monotonic() < deadline:
        rec = _record(path)
        status = _status(rec, point.stage)
        hit = False
        if point.boundary:
            hit = status == StageStatus.SUCCEEDED
        elif status == StageStatus.RUNNING:
            running_since = running_since or time.monotonic()
            hit = point.ready(env, release_id, running_since)
        if hit:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            killed = _record(path)
            assert killed is not None
            return killed
        if proc.poll() is not None:
            pytest.fail(f"the release ended (exit {proc.returncode}) before {point.title}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never reached {point.title}")


def _leftovers(env: CrashEnv, record: ReleaseRecord) -> dict[str, str]:
    """What the runs left behind that one clean run would not have: {what: description}."""
    found: dict[str, str] = {}
    # The deployment's containers are meant to outlive the run; every other one is not.
    for c in env.containers(record.release_id):
        stage = (c.get("Labels") or {}).get(STAGE_LABEL)
        if stage != "deploy":
            found[c["Id"]] = f"the {stage} container ({c['State']})"
    for where in ("weights/tmp", "build"):
        d = env.state / where
        for p in d.iterdir() if d.is_dir() else ():
            found[str(p)] = f"a {where.split('/')[0]} scratch dir"
    for sub in ("weights", "releases"):
        for p in (env.state / sub).rglob(".*"):
            if p.name.endswith(".tmp") or p.name.startswith(".oid-"):
                found[str(p)] = f"temp file {p.relative_to(env.state)}"
    return found


def _deployment_inconsistencies(env: CrashEnv, record: ReleaseRecord) -> list[str]:
    """The live deployment must be what its status says: one network and one router for
    the model, the champion's server running with all the router's weight, nothing else."""
    import json

    from gantry.adapters.haproxy import RuntimeAPI
    from gantry.deploy.docker import admin_socket_of

    (status_file,) = (env.state / "deployments").glob(f"gantry-{record.model}-*/status.json")
    status = json.loads(status_file.read_text())
    name = status_file.parent.name
    found = []
    if status.get("candidate") is not None or status["canary"]["phase"] != "succeeded":
        found.append(f"the deployment is left in canary phase {status['canary']['phase']}")
    networks = env.docker.networks.list(names=[name])
    if len(networks) != 1:
        found.append(f"{len(networks)} networks named {name}")
    live = env.docker.api.containers(all=True, filters={"label": f"ai.gantry.deployment={name}"})
    roles = sorted((c["Labels"].get("ai.gantry.role"), c["State"]) for c in live)
    if roles != [("router", "running"), ("server", "running")]:
        found.append(f"deployment containers {roles}")
    router = next((c for c in live if c["Labels"].get("ai.gantry.role") == "router"), None)
    if router is not None:
        path = admin_socket_of(env.docker.containers.get(router["Id"]).attrs)
        assert path is not None, "the router has no runtime API socket mounted"
        weights = RuntimeAPI(path).weights()
        champ = status["champion"]["slot"]
        if weights.get(champ) != 100 or any(w for s, w in weights.items() if s != champ):
            found.append(f"router weights {weights}, champion in slot {champ}")
    return found


def _mlflow(env: CrashEnv, record: ReleaseRecord) -> tuple[int, int]:
    """(runs, model versions) of the release in the state dir's MLflow store."""
    rid = record.release_id
    registry = MlflowRegistry(f"sqlite:///{env.state / 'mlflow' / 'mlflow.db'}", timeout_s=60)
    exp = registry.ensure_experiment("gantry-releases")
    runs = registry.client.search_runs([exp], filter_string=f"tags.`{RELEASE_TAG}` = '{rid}'")
    versions = registry.client.search_model_versions(
        f"name = '{record.model}' and tags.`{RELEASE_TAG}` = '{rid}'"
    )
    return len(runs), len(versions)


def _duplicates(env: CrashEnv, record: ReleaseRecord) -> list[str]:
    """More (or fewer) than one MLflow run, model version or pushed build tag."""
    found = []
    runs, versions = _mlflow(env, record)
    if runs != 1 or versions != 1:
        found.append(f"{runs} MLflow runs and {versions} versions")
    build = record.stages["build"].result or {}
    repository = str(build["repository"]).removeprefix(env.registry + "/")
    with RegistryClient(env.registry) as reg:
        tags = reg.tags(repository)
    builds = [t for t in tags if t.startswith("build-")]
    if builds != [build["tag"]]:
        found.append(f"build tags {builds}")
    digest_hex = str(build["digest"]).removeprefix("sha256:")
    strays = [
        t for t in tags if t.startswith("sha256-") and not t.startswith(f"sha256-{digest_hex}")
    ]
    if strays:
        found.append(f"signature tags of other digests {strays}")
    return found


def _lost(record_path: Path) -> list[str]:
    """Data the kills lost: the finished release must verify against its signatures."""
    try:
        verify_release(record_path)
    except GantryError as exc:
        return [f"the release does not verify: {exc.message}"]
    return []


def _run_to_end(env: CrashEnv, spec: Path, log: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gantry.cli", "release", str(spec)],
        env=env.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log.write_text(done.stdout + done.stderr)
    return done


def test_a_release_killed_at_every_point_resumes_cleanly(
    crash_env: CrashEnv, hub_faults: HubFaults, scenario: Scenario
) -> None:
    scenario.group = "crash: SIGKILL, then re-run"
    scenario.title = f"one release killed {len(POINTS)} times in a row, then run to the end"
    spec_path = crash_env.spec("crash")
    release_id = load_spec(spec_path).release_id
    record_path = crash_env.state / "releases" / f"{release_id}.json"
    logs = crash_env.state.parent
    # What the previous kill left: its point's line in the table, the stages it had
    # finished, the leftovers it made, and its record's start (to find it in the history).
    pending: tuple[Scenario, list[str], dict[str, str], str] | None = None

    def resumed(record: ReleaseRecord, seconds: float) -> None:
        """Check the run after a kill resumed it: called with that run's record."""
        if pending is None:
            return
        line, finished, left, started = pending
        redone = [s for s in finished if not record.stages[s].cached]
        assert not redone, f"after a kill {line.title!r}: finished but redone: {redone}"
        still = sorted(left.keys() & _leftovers(crash_env, record).keys())
        assert not still, f"after a kill {line.title!r}, still there: {still}"
        history = (record_path.parent / "history").glob(f"{record_path.stem}.*")
        kept = any(load_record(p).started_at.isoformat() == started for p in history)
        line.data_lost = [] if kept else ["the killed run's record is not in the history"]
        assert line.data_lost == []
        shown = sorted(set(left.values()))
        line.outcome = (
            f"the next run resumed with {', '.join(finished) or 'no stage'} cached"
            + (f" and cleaned up {', '.join(shown)}" if shown else "")
            + f" ({seconds:.0f}s to get past it)"
        )
        line.result = "passed"

    try:
        for key, point in POINTS.items():
            line = scenario.child(key, group=scenario.group, title=point.title)
            if point.stage == "weights":
                hub_faults.add(
                    mode="stall", stall_s=60, path_contains="onnx/model.onnx", method="GET"
                )
            t0 = time.monotonic()
            proc = _release(
                crash_env, spec_path, logs / f"crash.{key}.log", cold_build=key == "mid-build"
            )
            killed = _kill_at(crash_env, proc, record_path, point, release_id)
            hub_faults.clear()
            at_kill = killed.stages[point.stage].status
            assert at_kill == (StageStatus.SUCCEEDED if point.boundary else StageStatus.RUNNING), (
                f"the kill landed at {point.stage}={at_kill}, not where it was aimed"
            )
            resumed(killed, time.monotonic() - t0)
            finished = [s for s in STAGES if killed.stages[s].status == StageStatus.SUCCEEDED]
            left = _leftovers(crash_env, killed)
            if point.stage == "register":
                runs, versions = _mlflow(crash_env, killed)
                line.title += f"; the kill left {runs} run(s), {versions} version(s)"
            pending = (line, finished, left, killed.started_at.isoformat())

        t0 = time.monotonic()
        done = _run_to_end(crash_env, spec_path, logs / "crash.final.log")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == str(record_path)
        record = load_record(record_path)
        assert record.status == StageStatus.SUCCEEDED
        resumed(record, time.monotonic() - t0)

        problems = [
            *_leftovers(crash_env, record).values(),
            *_duplicates(crash_env, record),
            *_deployment_inconsistencies(crash_env, record),
        ]
        assert not problems, problems
        scenario.data_lost = _lost(record_path)
        assert scenario.data_lost == []
        scenario.outcome = (
            f"the last run finished in {time.monotonic() - t0:.0f}s; one MLflow run and "
            "version, one build tag, the release verifies, no container, scratch or temp file "
            "left, one network and router with the champion at 100 %, every killed run's "
            "record kept in the history"
        )
    finally:
        crash_env.remove_deployments()
