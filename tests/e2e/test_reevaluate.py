"""Flow `reevaluate` on real components: a champion deployed by `gantry release`, re-scored
through its live router by `gantry reevaluate`; an endpoint that does not answer gives no
verdict (not a regression); then the champion's container is swapped for the degraded
weights and the next re-evaluation reports the regression: exit code 1, the MLflow version
tag, and the Prefect event read back from the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT, GantryEnv, embedded_prefect, free_port

pytestmark = pytest.mark.e2e

MODEL = "minilm-reeval-e2e"


@pytest.fixture(scope="module")
def env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    with embedded_prefect(gantry_env) as (env, settings):
        try:
            yield env
        finally:
            _remove_deployment(settings)


def _remove_deployment(settings: Any) -> None:
    """This module's router and servers only (other modules keep theirs)."""
    from gantry.adapters.docker_engine import connect
    from gantry.deploy.docker import DockerTarget
    from gantry.stages.canary.state import DeploymentStore

    store = DeploymentStore(settings.deployments_dir, MODEL)
    client = connect(60)
    try:
        DockerTarget(
            client,
            model=MODEL,
            name=store.name,
            config_path=store.router_config,
            runtime_port=1,
            health_path="/health",
            port=None,
        ).remove_all()
    finally:
        client.close()


def _gantry(env: dict[str, str], *args: str, timeout: float = 900) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "gantry.cli", *args],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _registry(gantry_env: GantryEnv) -> Any:
    from gantry.adapters.mlflow_registry import MlflowRegistry

    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    return MlflowRegistry(uri, timeout_s=60)


def _events(api_url: str, name: str) -> list[Any]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[f"gantry.model.{MODEL}"]),
    )
    with SyncPrefectClient(api_url) as client:
        # limit: the client's default (100) is over what the 3.8.8 server accepts (50).
        return list(client.read_events(filter=flt, limit=10).events)


def _swap_in_degraded_weights(gantry_env: GantryEnv) -> Path:
    """What an operator's mistake (or an attacker) could do: the champion's own image,
    started in the champion's slot with the degraded revision's weights."""
    from gantry.adapters.docker_engine import connect
    from gantry.adapters.haproxy import Slot
    from gantry.deploy.docker import DockerTarget
    from gantry.settings import Settings
    from gantry.stages import weights as weights_stage
    from gantry.stages.canary.serving import launch_for, release_from_record
    from gantry.stages.canary.state import DeploymentStore
    from gantry.stages.weights import WeightStore

    settings = Settings.from_env(gantry_env.env)
    store = DeploymentStore(settings.deployments_dir, MODEL)
    status = store.load()
    assert status.champion is not None and status.port is not None
    release = release_from_record(Path(status.champion.record), "champion")
    degraded = weights_stage.run(
        release.spec.source.model_copy(update={"revision": "degraded"}),
        WeightStore(settings.weights_dir),
    )
    assert degraded.manifest_digest != release.weights.manifest_digest
    client = connect(120)
    try:
        target = DockerTarget(
            client,
            model=MODEL,
            name=store.name,
            config_path=store.router_config,
            runtime_port=release.spec.runtime.port,
            health_path=release.spec.runtime.health_path,
            port=status.port,
        )
        slot = Slot(status.champion.slot)
        launch = launch_for(release.spec, release.build, degraded, None, status.champion.version)
        target.start(slot, launch)
        target.wait_server_up(slot, 60)
    finally:
        client.close()
    return Path(degraded.path)


def test_a_champion_swapped_for_the_degraded_weights_is_reported_as_regressed(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    from gantry.adapters.mlflow_registry import CHAMPION
    from gantry.settings import Settings
    from gantry.stages.canary.state import DeploymentStore
    from gantry.stages.reevaluate import (
        EXPERIMENT,
        DeployedModel,
        ReevaluateOptions,
        reevaluate_model,
    )

    spec = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
    spec["mlflow"] = {"model_name": MODEL}
    path = tmp_path / "champion.yaml"
    path.write_text(yaml.safe_dump(spec))
    took: dict[str, float] = {}
    t0 = time.monotonic()
    rc, out, err = _gantry(env, "release", str(path))
    took["release"] = time.monotonic() - t0
    assert rc == 0, err[-3000:]
    record = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    version = record["stages"]["canary"]["result"]["version"]
    registry = _registry(gantry_env)
    assert registry.get_alias_version(MODEL, CHAMPION).version == version

    # 1. The champion as released: passes, nothing is re-scanned (its scan is minutes old).
    t0 = time.monotonic()
    rc, out, err = _gantry(env, "reevaluate", MODEL)
    took["reevaluate (passes)"] = time.monotonic() - t0
    assert rc == 0, err[-3000:]
    (ok,) = json.loads(out)["models"]
    assert ok["verdict"] == "passed" and ok["version"] == version, ok
    assert ok["score"] == ok["baseline"] == 1.0
    assert ok["drift"] == [] and ok["events"] == []
    assert ok["scan"]["stale"] is False and ok["scan"]["rescanned"] is False
    run = registry.get_run(ok["mlflow_run_id"])
    assert run.data.tags["gantry.version"] == version
    assert run.data.tags["gantry.reevaluation"] == "true"
    assert run.data.metrics["reeval.score"] == 1.0
    assert registry.client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    tags = registry.get_version(MODEL, version).tags
    assert tags["gantry.reevaluation.last_run_id"] == ok["mlflow_run_id"]
    assert tags["gantry.reevaluation.regressed"] == "false"

    # 1b. A re-run of the champion's spec that fails (the hub unreachable): the release's
    # latest record is now that failure, yet what serves keeps its own run's record, so
    # verification, re-evaluation and rollback still work.
    dead_hub = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    rc, out, err = _gantry(dead_hub, "release", str(path))
    assert rc == 1, err[-3000:]
    latest = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert latest["stages"]["weights"]["status"] == "failed"
    assert latest["stages"]["sign"]["status"] == "skipped"
    settings = Settings.from_env(gantry_env.env)
    served = DeploymentStore(settings.deployments_dir, MODEL).load().champion
    assert served is not None and served.record != out.strip().splitlines()[-1]
    rc, _out, err = _gantry(env, "verify", served.record)
    assert rc == 0, err[-3000:]
    rc, out, err = _gantry(env, "reevaluate", MODEL)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["models"][0]["verdict"] == "passed"
    rc, out, err = _gantry(env, "rollback", MODEL)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["action"] == "nothing-to-do"

    # 2. An endpoint that does not answer: retried, then no verdict; never a regression.
    status = DeploymentStore(settings.deployments_dir, MODEL).load()
    dead = status.model_copy(update={"port": free_port()})
    opts = ReevaluateOptions(models=(MODEL,), endpoint_attempts=2, endpoint_retry_delay_s=0.2)
    t0 = time.monotonic()
    down = reevaluate_model(DeployedModel(model=MODEL, status=dead), settings, opts)
    took["endpoint down (in process)"] = time.monotonic() - t0
    assert down.verdict == "no-verdict" and down.score is None, down.problems
    assert "no answer after 2 tries" in down.reasons[0] and "did not answer" in down.reasons[0]
    tags = registry.get_version(MODEL, version).tags
    assert tags["gantry.reevaluation.last_verdict"] == "no-verdict"
    assert tags["gantry.reevaluation.regressed"] == "false"

    # 2b. The champion's image missing from the registry (its record names a digest the
    # registry never held): a permanent error for that model; nothing is measured or
    # scanned on an image that cannot be verified.
    assert status.champion is not None
    rec = json.loads(Path(status.champion.record).read_text())
    build = rec["stages"]["build"]["result"]
    build["image"] = build["image"].split("@")[0] + "@sha256:" + "0" * 64
    moved = tmp_path / "record-missing-image.json"
    moved.write_text(json.dumps(rec))
    champion = status.champion.model_copy(update={"record": str(moved)})
    missing = reevaluate_model(
        DeployedModel(model=MODEL, status=status.model_copy(update={"champion": champion})),
        settings,
        opts,
    )
    assert missing.verdict == "error" and missing.error is not None, missing
    assert missing.error.type == "ChampionImageMissingError" and not missing.error.transient
    assert "is missing from the registry" in missing.reasons[0]
    assert missing.score is None and missing.scan is None

    # 3. The live champion swapped for the degraded weights: regression, tag, event.
    t0 = time.monotonic()
    degraded_dir = _swap_in_degraded_weights(gantry_env)
    took["swap"] = time.monotonic() - t0
    t0 = time.monotonic()
    rc, out, err = _gantry(env, "reevaluate", MODEL, "--max-scan-age-hours", "0", "--rollback")
    took["reevaluate (regressed, re-scan)"] = time.monotonic() - t0
    assert rc == 1, err[-3000:]
    (bad,) = json.loads(out)["models"]
    assert bad["verdict"] == "regressed", bad
    assert bad["score"] < 0.5 and bad["baseline"] == 1.0
    assert any("regresses from the champion's 1.0000" in r for r in bad["reasons"])
    assert any(str(degraded_dir) in d for d in bad["drift"])  # not what was verified
    assert bad["events"] == ["gantry.reevaluation.regressed"]
    # The rollback path was asked for, but a first release has no previous champion.
    assert bad["action"] == "rollback-unavailable"
    assert bad["scan"]["rescanned"] is True and bad["scan"]["stale"] is True
    assert "regressed" in err and MODEL in err
    tags = registry.get_version(MODEL, version).tags
    assert tags["gantry.reevaluation.regressed"] == "true"
    assert float(tags["gantry.reevaluation.score"]) == pytest.approx(bad["score"], abs=1e-5)
    assert tags["gantry.reevaluation.baseline"] == "1"
    assert tags["gantry.reevaluation.run_id"] == bad["mlflow_run_id"]
    assert "gantry.reevaluation.scanned_at" in tags
    regressed_run = registry.get_run(bad["mlflow_run_id"])
    assert regressed_run.data.metrics["reeval.regressed"] == 1.0
    assert regressed_run.data.tags["gantry.reevaluation.verdict"] == "regressed"

    deadline = time.monotonic() + 60
    while not (found := _events(env["PREFECT_API_URL"], "gantry.reevaluation.regressed")):
        assert time.monotonic() < deadline, "the event never reached the Prefect server"
        time.sleep(1)
    (event,) = found
    assert event.payload["version"] == version and event.payload["score"] == bad["score"]
    assert event.payload["baseline"] == 1.0 and event.payload["rollback"] is True
    print("seconds:", json.dumps({k: round(v, 1) for k, v in took.items()}))
