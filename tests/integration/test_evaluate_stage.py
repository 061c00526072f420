"""Stage `evaluate` against the real runtime, serving the real model and a degraded one.

Each runtime is a real ``python -m gantry_runtime`` process on a free port, evaluated on
the demo eval set: the real int8 MiniLM must pass threshold 0.8; the degraded variant
(``degrade_onnx``) must fail with a message giving both scores, also when compared with
the real model as champion. A dead port must end in EndpointUnavailableError.

The stage's own :func:`~gantry.stages.evaluate.run` then serves the real signed runtime
image hardened (the smoke tests' fixtures): its result carries the container's CPU and
memory under the eval set and the limits recommended from them, and a memory limit below
what it was seen to use fails the release with both figures.
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

import docker
import httpx
import pytest

from gantry.errors import EndpointUnavailableError, QualityGateError, ResourceLimitError
from gantry.localhub.demo import degrade_onnx
from gantry.settings import Settings
from gantry.spec import ReleaseSpec, parse_spec
from gantry.stages import evaluate
from gantry.stages.build import BuildResult
from gantry.stages.evaluate import EvalResult, gate_endpoint
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from tests._model_fixture import MODEL_NAME, RUNTIME_SERVER_DIR, ensure_test_model
from tests.integration.test_smoke_stage import _spec as smoke_spec
from tests.integration.test_smoke_stage import built, client, signed, weights  # noqa: F401
from tests.support import GantryEnv

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


# --- the stage in a release: the real image, hardened, its usage sampled ---------------------


def release_spec(env: GantryEnv) -> ReleaseSpec:
    return smoke_spec(env, evaluate={"dataset": str(DEMO_SET), "threshold": 0.8})


@pytest.fixture(scope="module")
def release_result(
    gantry_env: GantryEnv,
    built: BuildResult,  # noqa: F811 (the smoke tests' fixtures)
    weights: WeightsResult,  # noqa: F811
    signed: SignResult,  # noqa: F811
    client: docker.DockerClient,  # noqa: F811
) -> EvalResult:
    return evaluate.run(
        release_spec(gantry_env),
        built,
        weights,
        signed,
        Settings.from_env(),
        champion_metrics=lambda _name: None,
        client=client,
    )


def test_release_evaluation_carries_usage(
    gantry_env: GantryEnv, release_result: EvalResult
) -> None:
    r, spec = release_result, release_spec(gantry_env)
    print(f"\nrelease usage: {r.usage!r}\nlimits: {r.limits!r}")
    assert r.passed and r.score is not None and r.score >= 0.9
    u, a = r.usage, r.limits
    assert u is not None and a is not None
    # The demo set takes 2-6 s here and the engine gives a sample a second.
    assert u.samples >= 2 and u.restarts == 0 and not u.oom_killed
    assert u.cpu_p99_cores is not None and 0 < u.cpu_p99_cores <= spec.smoke.cpus * 1.05
    assert u.memory_p99_mb is not None and 30 < u.memory_p99_mb < spec.smoke.memory_mb
    assert u.memory_limit_mb == spec.smoke.memory_mb
    assert (a.cpus, a.memory_mb) == (spec.smoke.cpus, spec.smoke.memory_mb)
    if not u.conclusive:
        assert a.recommended_cpus is None and "inconclusive" in a.warnings[0]
        return
    assert a.recommended_cpus is not None and a.recommended_cpus >= u.cpu_p99_cores * 1.2
    assert a.recommended_memory_mb is not None
    assert a.recommended_memory_mb >= u.memory_p99_mb * 1.2
    m = r.metrics()
    assert m["usage.memory_p99_mb"] == u.memory_p99_mb
    assert m["limits.recommended_memory_mb"] == a.recommended_memory_mb


def test_memory_limit_under_the_observed_p99_fails(
    gantry_env: GantryEnv,
    release_result: EvalResult,
    built: BuildResult,  # noqa: F811
    weights: WeightsResult,  # noqa: F811
    signed: SignResult,  # noqa: F811
    client: docker.DockerClient,  # noqa: F811
) -> None:
    """A limit under what the model used: the engine OOM-kills it (loading the model or
    under the eval set's load, whichever reaches the limit first), and the stage fails on
    the limit with the configured figure, what it saw before the kill, and the fix: not
    with a retried "endpoint gone" or a bare start failure."""
    assert release_result.usage is not None and release_result.usage.memory_p99_mb is not None
    p99 = release_result.usage.memory_p99_mb
    tight = int(p99 * 0.9)
    spec = release_spec(gantry_env)
    # Set past validation: the spec's floor (128 MiB) may be above what the model needs.
    spec = spec.model_copy(update={"smoke": spec.smoke.model_copy(update={"memory_mb": tight})})
    with pytest.raises(ResourceLimitError) as info:
        evaluate.run(
            spec,
            built,
            weights,
            signed,
            Settings.from_env(),
            champion_metrics=lambda _name: None,
            client=client,
        )
    err = info.value
    print(f"\nlimit {tight} MiB (p99 with room {p99:.1f}): {err}")
    text = str(err)
    assert err.configured_mb == tight and f"smoke.memory_mb {tight} MiB" in text
    assert "OOM-killed" in text
    if err.observed_p99_mb is not None:
        assert f"p99 {err.observed_p99_mb:.1f} MiB" in text
    assert "fix: " in text and "smoke.memory_mb: " in text.split("fix: ")[1]
