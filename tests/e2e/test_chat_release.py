"""A real chat LLM through all eight stages: SmolLM2-135M-Instruct (GGUF) on the llama.cpp
runtime, published to the local hub by upload, released with `gantry release`.

v1 streams the "2 + 2" smoke probe, scores 1.0 on the chat eval set with TTFT percentiles in
its record, is registered in MLflow with its aliases and deployed behind the router; a
second run finds every stage cached. The degraded revision (noise on its norm weights)
passes its relaxed gates, and the canary rolls it back at its first step while v1 keeps
serving a steady chat load without one failed request. Every query of the Grafana dashboard
(docs/dashboards/gantry-model.json) then returns series for the model from the embedded
Prometheus the canary used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import (
    REPO_ROOT,
    GantryEnv,
    SteadyLoad,
    embedded_prefect,
    gantry_release,
)

pytestmark = pytest.mark.e2e

MODEL = "smollm2-chat-e2e"
DASHBOARD = REPO_ROOT / "docs" / "dashboards" / "gantry-model.json"
STAGES = ["weights", "build", "scan", "sign", "smoke", "evaluate", "register", "canary"]


@pytest.fixture(scope="module")
def env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    from gantry.localhub.chat_demo import assemble_chat_demo
    from gantry.localhub.store import HubStore
    from gantry.settings import Settings

    settings = Settings.from_env(gantry_env.env)
    assemble_chat_demo(HubStore(settings.hub_dir / "store"), settings.demo_wheels_dir)
    with embedded_prefect(gantry_env, remove_deployments=True) as (env, _settings):
        yield env


def _spec(tmp_path: Path, example: str) -> Path:
    data = yaml.safe_load((REPO_ROOT / "examples" / example).read_text())
    data["mlflow"] = {"model_name": MODEL}
    # The test proves the mechanics; production windows are longer.
    data["canary"].update(window_s=8, keep_warm_s=3, drain_s=10)
    path = tmp_path / example
    path.write_text(yaml.safe_dump(data))
    return path


def _champion(gantry_env: GantryEnv) -> str | None:
    from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry

    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    ref = MlflowRegistry(uri, timeout_s=60).get_alias_version(MODEL, CHAMPION)
    return None if ref is None else ref.version


@pytest.mark.timeout(1800)
def test_chat_model_released_then_degraded_revision_rolled_back(
    env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    rc, first, err = gantry_release(env, _spec(tmp_path, "smollm2-chat.yaml"))
    assert rc == 0, err[-4000:]
    assert [s for s in STAGES if first["stages"][s]["status"] == "succeeded"] == STAGES
    smoke = first["stages"]["smoke"]["result"]
    assert "4" in smoke["probe"]["answer"] and smoke["probe"]["ttft_s"] > 0
    ev = first["stages"]["evaluate"]["result"]
    assert ev["score"] == 1.0 and ev["passed"]
    assert 0 < ev["ttft_p50_ms"] <= ev["ttft_p95_ms"] <= ev["ttft_p99_ms"]
    canary = first["stages"]["canary"]["result"]
    assert canary["outcome"] == "deployed"
    v1 = canary["version"]
    assert _champion(gantry_env) == v1

    rc, again, err = gantry_release(env, _spec(tmp_path, "smollm2-chat.yaml"))
    assert rc == 0, err[-4000:]
    assert {s: again["stages"][s]["cached"] for s in STAGES} == dict.fromkeys(STAGES, True)

    load = SteadyLoad(
        canary["endpoint"], tmp_path / "load.json", rps=2, protocol="chat", model="smollm2-chat"
    )
    try:
        rc, bad, err = gantry_release(env, _spec(tmp_path, "smollm2-degraded.yaml"))
    finally:
        summary = load.stop()
    assert rc == 1, err[-4000:]
    stage = bad["stages"]["canary"]
    assert stage["status"] == "failed" and stage["error"]["type"] == "CanaryFailedError"
    assert "quality" in stage["error"]["message"]
    assert bad["stages"]["evaluate"]["result"]["score"] < 0.5  # passed its relaxed gate only
    assert summary["sent"] >= 20 and summary["failed"] == 0, summary["failures"][:5]
    assert _champion(gantry_env) == v1

    (status_path,) = (gantry_env.state_dir / "deployments").glob(f"gantry-{MODEL}-*/status.json")
    status: dict[str, Any] = json.loads(status_path.read_text())
    assert status["champion"]["version"] == v1 and status["candidate"] is None
    assert status["canary"]["phase"] == "rolled-back"
    # Rolled back at its first step (10 %): no verdict passed, the weight went to 0.
    assert status["canary"]["step"] == 0 and status["canary"]["weight"] == 0
    verdicts = status["canary"]["verdicts"]
    assert verdicts and {v["weight"] for v in verdicts} == {10} and not verdicts[-1]["passed"]

    _every_dashboard_query_returns_series(env, canary["endpoint"])


def _every_dashboard_query_returns_series(env: dict[str, str], endpoint: str) -> None:
    """Each panel query, as Grafana sends it for this model, gives at least one series (a
    0 or a NaN is data; an empty answer means a panel would show "No data")."""
    from gantry.adapters.prometheus import PrometheusClient
    from gantry.metrics.dashboard import instantiate, panel_queries
    from gantry.settings import Settings

    # Streamed, as chat clients ask: only streamed answers feed the TTFT histogram; and the
    # panels' 1m rate windows need requests newer than the canary's.
    with httpx.Client(base_url=endpoint, timeout=60, trust_env=False) as http:
        for i in range(4):
            body = {
                "model": "smollm2-chat",
                "messages": [{"role": "user", "content": f"Name a colour ({i})."}],
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            }
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()[:300]
                r.read()
    queries = panel_queries(DASHBOARD)
    empty = {(q.title, q.ref_id): instantiate(q.expr, MODEL, "1m") for q in queries}
    deadline = time.monotonic() + 15  # a few 1 s scrapes of the exporter and the servers
    with PrometheusClient(Settings.from_env(env).prometheus_url, timeout_s=10) as prom:
        while True:
            empty = {k: e for k, e in empty.items() if not prom.query(e).samples}
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert not empty, "panel queries without a series:\n" + "\n".join(
        f"{title} [{ref}]: {e}" for (title, ref), e in empty.items()
    )
