"""Two worker hosts (``GANTRY_TOPOLOGY=multi``) deploying through one engine share a
model's deployment, take turns on it, and one rolls back to a version the other released.

Each host is a state dir of its own, running `gantry release` and `gantry rollback` as
real CLI processes against one Prefect server (the locks are global concurrency limits
with a lease), one MLflow tracking server on PostgreSQL (the records, the registry), the
session's registry and hub endpoint, and the one Docker engine. Hosts that are
containers, killed or cut off mid-release, are tests/reliability/test_topology.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import docker
import httpx
import pytest
import yaml

from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry
from gantry.deploy.docker import MODEL_LABEL, ROLE_LABEL
from gantry.localenv.services import metrics_services
from gantry.record import load_record
from gantry.settings import Settings
from tests.reliability.conftest import Scenario, busy_demo_spec
from tests.support import (
    GantryEnv,
    PrefectServer,
    free_port,
    gantry_cli,
    tracking_server,
)

pytestmark = pytest.mark.reliability

MODEL = "minilm-hosts"


@pytest.fixture(scope="module")
def tracking_url() -> Iterator[str]:
    with tracking_server() as url:
        yield url


def _host_env(
    root: Path,
    name: str,
    gantry_env: GantryEnv,
    prefect: PrefectServer,
    url: str,
    **extra: str,
) -> dict[str, str]:
    env = {
        **os.environ,
        **gantry_env.env,
        **prefect.env(),
        "GANTRY_STATE_DIR": str(root / name),
        "GANTRY_TOPOLOGY": "multi",
        "MLFLOW_TRACKING_URI": url,
        "GANTRY_PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}",
        "GANTRY_EXPORTER_ADDR": f"127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("PREFECT_HOME", None)
    return env


def _keys(root: Path, env: dict[str, str]) -> Path:
    """One signing key pair for every host (a key made on one host is that host's alone:
    the multi topology refuses to make one), as a secret mounted on each worker would be."""
    keys = root / "keys"
    if not (keys / "cosign.key").is_file():
        made = gantry_cli(env, "keys", "generate", "--dir", str(keys), timeout=120)
        assert made.returncode == 0, made.stderr[-2000:]
    return keys / "cosign.key"


def _spec(root: Path, env: dict[str, str], model: str = MODEL, revision: str = "v1") -> Path:
    data = busy_demo_spec(root, model, revision)
    data.setdefault("sign", {})["key"] = str(_keys(root, env))
    if revision == "degraded":  # past the eval gate, so the canary has to catch it
        data["evaluate"].update(threshold=0.2, tolerance=1.0)
    path = root / f"{model}-{revision}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _release(env: dict[str, str], spec: Path) -> subprocess.CompletedProcess[str]:
    return gantry_cli(env, "release", str(spec), timeout=900)


def _canaries(deployments: Path, model: str, since: float) -> list[tuple[float, float, str]]:
    """(start, decision, outcome) of each canary of ``model`` in the shared deployments
    started after ``since``."""
    (dep,) = deployments.glob(f"gantry-{model}-*")
    out = []
    for path in (dep / "history").glob("*.json"):
        c = json.loads(path.read_text())
        start = datetime.fromisoformat(c["started_at"]).timestamp()
        if start >= since:
            out.append((start, datetime.fromisoformat(c["decided_at"]).timestamp(), c["phase"]))
    return sorted(out)


def test_hosts_share_a_models_deployment_take_turns_and_roll_back_to_a_dead_hosts_version(
    gantry_env: GantryEnv,
    prefect_server: PrefectServer,
    tracking_url: str,
    tmp_path: Path,
    scenario: Scenario,
) -> None:
    """Two hosts deploying through one engine share GANTRY_DEPLOYMENTS_DIR. Host A releases
    v1; then a degraded candidate on A and v2 on B start together: their canaries take
    turns on the deployment lock (a Prefect global concurrency limit) in the one
    deployment. A is then gone, and `gantry rollback` on B starts v1 again from A's shared
    record (its weights fetched again by commit, its weights signature read from the
    share)."""
    scenario.group = "hosts: one engine's deployments"
    scenario.title = "two hosts share a model's deployment; one of them is then deleted"
    model = "minilm-hosts-shared"
    shared = tmp_path / "deployments"
    envs = {
        h: _host_env(
            tmp_path,
            h,
            gantry_env,
            prefect_server,
            tracking_url,
            GANTRY_DEPLOYMENTS_DIR=str(shared),
        )
        for h in ("host-a", "host-b")
    }
    host_a, host_b = envs["host-a"], envs["host-b"]
    client = docker.from_env(timeout=120)
    try:
        first = _release(host_a, _spec(tmp_path, host_a, model, "v1"))
        assert first.returncode == 0, first.stderr[-3000:]
        v1 = load_record(Path(first.stdout.strip().splitlines()[-1]))
        v1_version = (v1.stages["canary"].result or {})["version"]

        # A candidate of one model on each host at the same moment.
        started = time.time()
        with ThreadPoolExecutor(2) as pool:
            on_a = pool.submit(_release, host_a, _spec(tmp_path, host_a, model, "degraded"))
            on_b = pool.submit(_release, host_b, _spec(tmp_path, host_b, model, "v2"))
            bad, good = on_a.result(), on_b.result()
        assert good.returncode == 0, good.stderr[-3000:]
        assert bad.returncode == 1 and "CanaryFailedError" in bad.stderr, bad.stderr[-3000:]
        canaries = _canaries(shared, model, since=started)
        assert len(canaries) == 2, canaries
        (s1, e1, p1), (s2, e2, p2) = canaries
        assert e1 <= s2, f"two canaries of {model} overlapped: {canaries}"
        assert sorted([p1, p2]) == ["rolled-back", "succeeded"]
        v2 = load_record(Path(good.stdout.strip().splitlines()[-1]))
        registry = MlflowRegistry(tracking_url, timeout_s=60)
        champion = registry.get_alias_version(model, CHAMPION)
        assert champion is not None
        assert champion.version == (v2.stages["register"].result or {})["version"]
        routers = client.containers.list(
            all=True, filters={"label": [f"{ROLE_LABEL}=router", f"{MODEL_LABEL}={model}"]}
        )
        assert len(routers) == 1, [r.name for r in routers]  # one deployment, not one per host
        line = scenario.child(
            "turns",
            group="hosts: releases at once",
            title="a degraded candidate on host A and a good one on host B started together",
        )
        line.outcome = (
            f"their canaries took turns ({p1} {e1 - s1:.0f}s, then {p2} {e2 - s2:.0f}s, no "
            "overlap) in the one deployment; champion = the good candidate"
        )
        line.result = "passed"

        for svc in metrics_services(Settings.from_env(host_a)):
            svc.stop()
        shutil.rmtree(tmp_path / "host-a")  # A is gone; the deployment it made serves on
        back = gantry_cli(host_b, "rollback", model, timeout=600)
        assert back.returncode == 0, back.stderr[-3000:]
        assert f"release {v1.release_id} was released on another host" in back.stderr
        champion = registry.get_alias_version(model, CHAMPION)
        assert champion is not None and champion.version == v1_version
        endpoint = (v2.stages["canary"].result or {})["endpoint"]
        answer = httpx.post(
            f"{endpoint}/v1/embeddings",
            json={"model": model, "input": ["v1 serves again"]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text[:500]
        scenario.outcome = (
            "host A deleted after its v1 and a degraded candidate: `gantry rollback` on B "
            "started v1 from A's shared record (weights fetched again by commit, signature "
            "from the share) and v1 serves"
        )
    finally:
        from gantry.deploy.docker import remove_deployments

        remove_deployments(client, shared)
        for env in envs.values():
            for svc in metrics_services(Settings.from_env(env)):
                svc.stop()
        client.close()
