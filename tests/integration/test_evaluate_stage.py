"""Stage `evaluate` against the real runtime, serving the real model and a degraded one.

Each runtime is a real ``python -m gantry_runtime`` process on a free port, evaluated on
the demo eval set: the real int8 MiniLM must pass threshold 0.8; the degraded variant
(``degrade_onnx``) must fail with a message giving both scores, also when compared with
the real model as champion. A dead port must end in EndpointUnavailableError.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gantry.errors import EndpointUnavailableError, QualityGateError
from gantry.localhub.demo import degrade_onnx
from gantry.settings import Settings
from gantry.spec import ReleaseSpec, parse_spec
from gantry.stages.evaluate import EvalResult, gate_endpoint
from tests._model_fixture import MODEL_NAME, RUNTIME_SERVER_DIR, ensure_test_model

pytestmark = pytest.mark.integration

DEMO_SET = Path(__file__).resolve().parents[2] / "examples" / "eval" / "minilm-retrieval.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_test_model()


@pytest.fixture(scope="module")
def degraded_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("degraded") / "model"
    shutil.copytree(model_dir, d)
    onnx = d / "onnx" / "model.onnx"
    onnx.write_bytes(degrade_onnx(onnx.read_bytes()))
    return d


def serve(model: Path, logs: Path) -> Iterator[str]:
    """Run the runtime on ``model`` until the generator is closed; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(RUNTIME_SERVER_DIR),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_PATH": str(model),
        "MODEL_NAME": MODEL_NAME,
        "GANTRY_DEVICE": "cpu",
    }
    log = logs / f"runtime-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gantry_runtime"], env=env, stdout=out, stderr=out, cwd=logs
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"runtime exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"runtime not healthy:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def real_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(model_dir, tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def degraded_url(degraded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(degraded_dir, tmp_path_factory.mktemp("degraded-run"))


def make_spec(**evaluate: object) -> ReleaseSpec:
    return parse_spec(
        {
            "name": "minilm",
            "source": {"repo_id": "gantry-demo/all-MiniLM-L6-v2"},
            "runtime": {"served_model_name": MODEL_NAME},
            "evaluate": {"dataset": str(DEMO_SET), "threshold": 0.8, **evaluate},
        }
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path_factory.mktemp("state"))})


@pytest.fixture(scope="module")
def real_result(real_url: str, settings: Settings) -> EvalResult:
    return gate_endpoint(make_spec(), real_url, settings)


def test_real_model_passes(real_result: EvalResult) -> None:
    r = real_result
    print(f"\nreal: {r.model_dump_json()}")
    assert r.passed and not r.skipped
    assert r.score == r.top1 and r.top1 is not None and r.top1 >= 0.9
    assert r.mrr is not None and r.mrr >= r.top1
    assert r.n >= 200 and r.requests > 0
    assert r.latency_p50_ms is not None and r.latency_p99_ms is not None
    assert 0 < r.latency_p50_ms <= r.latency_p99_ms
    assert r.throughput_rps is not None and r.throughput_rps > 0
    assert r.ttft_p50_ms is None and r.accuracy is None  # chat-only fields
    rows = [json.loads(ln) for ln in Path(str(r.results_path)).read_text().splitlines()]
    assert len(rows) == r.n
    assert "/releases/minilm-" in str(r.results_path) and "/evaluate/" in str(r.results_path)
    assert r.metrics()["top1"] == r.score


def test_degraded_model_fails_under_threshold_and_against_champion(
    degraded_url: str, real_result: EvalResult, settings: Settings
) -> None:
    champion = real_result.score
    assert champion is not None
    seen: list[str] = []

    def champion_metrics(name: str) -> dict[str, float] | None:
        seen.append(name)
        return {"top1": champion, "mrr": 1.0}

    with pytest.raises(QualityGateError) as exc:
        gate_endpoint(make_spec(), degraded_url, settings, champion_metrics=champion_metrics)
    err = exc.value
    print(f"\ndegraded: {err}")
    assert seen == ["minilm"]
    assert err.champion_score == champion
    assert err.score < 0.8
    message = str(err)
    assert f"{err.score:.4f}" in message and f"{champion:.4f}" in message
    assert "under the threshold" in message and "beyond the tolerance" in message
    assert "fix:" in message


def test_regression_alone_fails_the_gate(
    degraded_url: str, real_result: EvalResult, settings: Settings
) -> None:
    """Over an (unrealistically low) threshold, the regression from the champion still fails."""
    assert real_result.score is not None
    with pytest.raises(QualityGateError) as exc:
        gate_endpoint(
            make_spec(threshold=0.1),
            degraded_url,
            settings,
            champion_metrics=lambda _name: {"top1": float(real_result.score or 0)},
        )
    assert "beyond the tolerance" in str(exc.value)
    assert "under the threshold" not in str(exc.value)


def test_endpoint_down_is_transient_not_a_verdict(settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(EndpointUnavailableError, match="after 3 attempts"):
        gate_endpoint(make_spec(), url, settings, attempts=3, backoff_s=0.05)
    assert time.monotonic() - t0 < 10
