"""Releases at the same time, through `gantry release` on the real engine: the same spec
twice (one run is refused at once, the other finishes), two candidates of one model (their
canaries take turns: never two traffic shifts of a model at once), and another model beside
them (not held up)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry
from tests.reliability.conftest import BUSY_MACHINE_CANARY, Scenario
from tests.support import REPO_ROOT, GantryEnv, GantryProcess, embedded_prefect, gantry_popen

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    with embedded_prefect(gantry_env, remove_deployments=True) as (env, _settings):
        yield env


def _spec(tmp_path: Path, model: str, revision: str) -> Path:
    data = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
    data["source"]["revision"] = revision
    subset = tmp_path / "eval-subset.jsonl"
    if not subset.exists():
        lines = (REPO_ROOT / data["evaluate"]["dataset"]).read_text().splitlines()
        subset.write_text("\n".join(lines[::20]) + "\n")
    data["evaluate"]["dataset"] = str(subset)
    data["mlflow"] = {"model_name": model}
    data["canary"] = BUSY_MACHINE_CANARY
    if revision == "degraded":
        data["evaluate"].update(threshold=0.2, tolerance=1.0)
    path = tmp_path / f"{model}-{revision}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(env: dict[str, str], spec: Path) -> GantryProcess:
    return gantry_popen(env, "release", str(spec))


def _finish(proc: GantryProcess, t0: float | None = None) -> tuple[int, dict[str, Any], str, float]:
    """Exit code, record (none for a refused run: the record is the running one's, which
    may not be written yet), stderr, and seconds since ``t0`` (default: now)."""
    t0 = time.monotonic() if t0 is None else t0
    rc, out, err = proc.finish(timeout=1200)
    refused = "is already running" in err
    record = {} if refused else json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return rc, record, err, time.monotonic() - t0


def _champion(gantry_env: GantryEnv, model: str) -> str | None:
    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    ref = MlflowRegistry(uri, timeout_s=60).get_alias_version(model, CHAMPION)
    return None if ref is None else ref.version


def _canaries(gantry_env: GantryEnv, model: str, since: float) -> list[tuple[float, float, str]]:
    """(start, decision, outcome) of each canary of ``model`` started after ``since``."""
    (dep,) = (gantry_env.state_dir / "deployments").glob(f"gantry-{model}-*")
    out = []
    for path in (dep / "history").glob("*.json"):
        c = json.loads(path.read_text())
        start = datetime.fromisoformat(c["started_at"]).timestamp()
        end = datetime.fromisoformat(c["decided_at"]).timestamp()
        if start >= since:
            out.append((start, end, c["phase"]))
    return sorted(out)


def test_releases_at_the_same_time(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path, scenario: Scenario
) -> None:
    scenario.group = "concurrency: releases at once"
    scenario.title = (
        "4 releases started together: a spec twice, a second candidate of the same model, "
        "another model"
    )
    a, b = "conc-a", "conc-b"
    first, _, err, _ = _finish(_start(env, _spec(tmp_path, a, "v1")))
    assert first == 0, err[-3000:]
    champion_v1 = _champion(gantry_env, a)

    good, bad, other = (
        _spec(tmp_path, a, "v2"),
        _spec(tmp_path, a, "degraded"),
        _spec(tmp_path, b, "v1"),
    )
    started, t0 = time.time(), time.monotonic()
    procs = {
        "good": _start(env, good),
        "good-again": _start(env, good),
        "degraded": _start(env, bad),
        "other-model": _start(env, other),
    }
    # One waiter each, so every run's output is drained and its end time is its own.
    with ThreadPoolExecutor(len(procs)) as pool:
        waiting = {k: pool.submit(_finish, p, t0) for k, p in procs.items()}
        done = {k: f.result() for k, f in waiting.items()}

    # The same spec twice: exactly one run, the other refused at once, naming the holder.
    twins = sorted([done["good"], done["good-again"]], key=lambda d: d[0])
    (rc_ok, record, _, _), (rc_refused, _, refused_err, refused_s) = twins
    assert (rc_ok, rc_refused) == (0, 1), refused_err[-3000:]
    assert "is already running" in refused_err and "pid" in refused_err
    assert refused_s < 120
    assert record["status"] == "succeeded"  # the refused run did not touch its record
    line = scenario.child(
        "same-spec",
        group=scenario.group,
        title="the same spec started twice at once",
    )
    line.outcome = (
        "one run finished; the other was refused (ReleaseInProgressError naming the holder's "
        "pid) and left the running release's record alone"
    )
    line.result = "passed"

    # Two candidates of one model: both ran their canary, one after the other.
    rc_bad, bad_record, bad_err, _ = done["degraded"]
    assert rc_bad == 1, bad_err[-3000:]
    assert bad_record["stages"]["canary"]["error"]["type"] == "CanaryFailedError"
    canaries = _canaries(gantry_env, a, since=started)
    assert len(canaries) == 2, canaries
    (s1, e1, p1), (s2, e2, p2) = canaries
    assert e1 <= s2, f"two canaries of {a} overlapped: {canaries}"
    assert sorted([p1, p2]) == ["rolled-back", "succeeded"]
    version_v2 = record["stages"]["register"]["result"]["version"]
    assert _champion(gantry_env, a) == version_v2 != champion_v1
    line = scenario.child(
        "same-model", group=scenario.group, title="two candidates of one model at once"
    )
    line.outcome = (
        f"their canaries took turns ({p1} {e1 - s1:.0f}s, then {p2} {e2 - s2:.0f}s, no "
        f"overlap); champion = v2's version {version_v2}"
    )
    line.result = "passed"

    # Another model at the same time: not held up by either lock.
    rc_other, other_record, other_err, _ = done["other-model"]
    assert rc_other == 0, other_err[-3000:]
    assert other_record["stages"]["canary"]["result"]["outcome"] == "deployed"
    assert _champion(gantry_env, b) == other_record["stages"]["register"]["result"]["version"]
    line = scenario.child(
        "other-model", group=scenario.group, title="another model released beside them"
    )
    line.outcome = "deployed as its first champion while the other model's canaries ran"
    line.result = "passed"
    scenario.outcome = "one refused, the rest succeeded or were rolled back by their canary"
