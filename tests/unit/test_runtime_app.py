"""The reference runtime in-process: health lifecycle, OpenAI embeddings, errors, metrics.

Runs the real all-MiniLM-L6-v2 int8 ONNX model (see ``tests/_model_fixture.py``) on CPU.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The runtime is not part of the gantry package: it ships in its own image. Importing it
# by its repo path (its modules import each other relatively) keeps mypy able to check it.
from gantry_runtime.app import (
    Config,
    ConfigError,
    create_app,
)
from gantry_runtime.model import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    EmbeddingModel,
    Embeddings,
    ModelLoadError,
    select_providers,
)
from starlette.testclient import TestClient

from tests._model_fixture import DIMENSIONS, MODEL_NAME, ensure_test_model

pytestmark = pytest.mark.unit

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
STOCKS = "The stock market fell sharply today."


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_test_model()


@pytest.fixture(scope="module")
def config(model_dir: Path) -> Config:
    return Config(model_path=model_dir, model_name=MODEL_NAME, device="cpu")


def wait_for_health(client: TestClient, timeout_s: float = 60) -> tuple[int, dict[str, Any]]:
    """Poll /health until it stops answering 503; the final status code and body."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/health")
        if response.status_code != 503 or time.monotonic() > deadline:
            return response.status_code, response.json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(config: Config) -> Iterator[TestClient]:
    with TestClient(create_app(config)) as c:
        assert wait_for_health(c)[0] == 200
        yield c


def embed(client: TestClient, texts: str | list[str], **extra: Any) -> np.ndarray[Any, Any]:
    response = client.post("/v1/embeddings", json={"model": MODEL_NAME, "input": texts, **extra})
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_health_is_503_while_loading_then_200_with_provider(config: Config) -> None:
    release = threading.Event()

    def slow_loader(cfg: Config) -> EmbeddingModel:
        release.wait(30)
        return EmbeddingModel.load(cfg.model_path, cfg.device)

    with TestClient(create_app(config, loader=slow_loader)) as c:
        loading = c.get("/health")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        refused = c.post("/v1/embeddings", json={"input": "hi"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "model_loading"

        release.set()
        code, health = wait_for_health(c)
    assert code == 200
    assert health["status"] == "ok"
    assert health["model"] == MODEL_NAME
    assert health["provider"] == CPU_PROVIDER
    assert health["providers"] == [CPU_PROVIDER]
    assert health["device"] == "cpu"
    assert health["dimensions"] == DIMENSIONS
    assert isinstance(health["load_seconds"], float)


def test_float_embeddings_have_openai_shape(client: TestClient) -> None:
    texts = [FOOD, BREAD, STOCKS]
    response = client.post("/v1/embeddings", json={"model": "anything", "input": texts})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == MODEL_NAME
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert {d["object"] for d in body["data"]} == {"embedding"}
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (3, DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3


def test_order_follows_input_not_length(client: TestClient) -> None:
    # The model sorts by length into micro-batches; the answer must not be reordered.
    texts = ["short", STOCKS + " " + BREAD * 5, FOOD]
    together = embed(client, texts)
    one_by_one = np.vstack([embed(client, [t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)


def test_base64_is_little_endian_float32_of_the_float_answer(client: TestClient) -> None:
    floats = embed(client, [FOOD, STOCKS])
    response = client.post(
        "/v1/embeddings", json={"input": [FOOD, STOCKS], "encoding_format": "base64"}
    )
    assert response.status_code == 200
    decoded = np.vstack(
        [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            for d in response.json()["data"]
        ]
    )
    assert decoded.shape == (2, DIMENSIONS)
    np.testing.assert_allclose(decoded, floats, atol=1e-6)


def test_a_string_input_and_matching_dimensions_are_accepted(client: TestClient) -> None:
    vectors = embed(client, FOOD, dimensions=DIMENSIONS)
    assert vectors.shape == (1, DIMENSIONS)


def test_similar_sentences_score_higher_than_dissimilar(client: TestClient) -> None:
    food, bread, stocks = embed(client, [FOOD, BREAD, STOCKS])
    similar, dissimilar = float(food @ bread), float(food @ stocks)
    assert similar > 0.5 > dissimilar
    assert similar - dissimilar > 0.3


def test_long_input_is_truncated_not_refused(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"input": "word " * 5000})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 256  # max_seq_length, specials included


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL_NAME}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input"),
        ({"input": 5}, 400, "input"),
        ({"input": ["ok", 5]}, 400, "input"),
        ({"input": [1, 2, 3]}, 400, "input"),
        ({"input": [[1, 2], [3]]}, 400, "input"),
        ({"input": "x", "model": 7}, 400, "model"),
        ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"input": "x", "dimensions": 128}, 400, "dimensions"),
        ({"input": "x", "dimensions": "384"}, 400, "dimensions"),
        ({"input": "x", "dimensions": True}, 400, "dimensions"),
        ({"input": ["x"] * 257}, 413, "input"),
        ([{"input": "x"}], 400, None),
    ],
)
def test_invalid_requests_get_openai_errors(
    client: TestClient, body: Any, status: int, param: str | None
) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_and_oversized_requests_are_refused(config: Config) -> None:
    small = Config(model_path=config.model_path, model_name=MODEL_NAME, max_total_chars=100)
    done = threading.Event()

    def never_loads(_: Config) -> EmbeddingModel:
        done.wait(30)  # requests are validated before the model is needed
        raise ModelLoadError("test over")

    with TestClient(create_app(small, loader=never_loads)) as c:
        bad = c.post(
            "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        assert "JSON" in bad.json()["error"]["message"]
        big = c.post("/v1/embeddings", json={"input": ["a" * 60, "b" * 60]})
        assert big.status_code == 413
        assert "120 characters exceed the limit of 100" in big.json()["error"]["message"]
        huge = c.post("/v1/embeddings", content=b" " * (small.max_body_bytes + 1))
        assert huge.status_code == 413
        done.set()


def test_unknown_routes_answer_in_openai_shape(client: TestClient) -> None:
    response = client.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Not Found"
    assert client.get("/v1/embeddings").status_code == 405


def test_models_lists_the_served_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_NAME]


def test_metrics_count_requests_and_describe_the_model(client: TestClient) -> None:
    embed(client, [FOOD])
    client.post("/v1/embeddings", json={"input": []})
    text = client.get("/metrics").text
    assert 'gantry_runtime_requests_total{endpoint="/v1/embeddings",status="200"}' in text
    assert 'gantry_runtime_requests_total{endpoint="/v1/embeddings",status="400"}' in text
    assert "gantry_runtime_embeddings_duration_seconds_count" in text
    assert "gantry_runtime_model_loaded 1.0" in text
    labels = f'device="cpu",model="{MODEL_NAME}",provider="{CPU_PROVIDER}"'
    assert f"gantry_runtime_model_info{{{labels}}} 1.0" in text
    assert "gantry_runtime_embeddings_tokens_total" in text


def test_health_stays_responsive_during_inference(client: TestClient, config: Config) -> None:
    model = EmbeddingModel.load(config.model_path, "cpu")
    started, release = threading.Event(), threading.Event()
    real_embed: Callable[[Sequence[str]], Embeddings] = model.embed

    def blocking_embed(texts: Sequence[str]) -> Embeddings:
        started.set()
        release.wait(30)
        return real_embed(texts)

    model.embed = blocking_embed  # type: ignore[method-assign]
    with TestClient(create_app(config, loader=lambda _: model)) as c:
        assert wait_for_health(c)[0] == 200
        results: list[int] = []
        worker = threading.Thread(
            target=lambda: results.append(
                c.post("/v1/embeddings", json={"input": FOOD}).status_code
            )
        )
        worker.start()
        try:
            assert started.wait(30)
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            assert time.monotonic() - t0 < 2
        finally:
            release.set()
            worker.join(30)
    assert results == [200]


def test_cuda_requested_without_cuda_is_a_visible_load_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(model_dir))
    monkeypatch.setenv("GANTRY_DEVICE", "cuda")
    with TestClient(create_app()) as c:
        code, health = wait_for_health(c)
        assert code == 500
        assert health["status"] == "error"
        assert CUDA_PROVIDER in health["error"]
        refused = c.post("/v1/embeddings", json={"input": FOOD})
        assert refused.status_code == 500
        assert refused.json()["error"]["code"] == "model_load_failed"
        assert "gantry_runtime_model_loaded 0.0" in c.get("/metrics").text


def test_a_missing_model_dir_is_a_visible_load_error(tmp_path: Path) -> None:
    config = Config(model_path=tmp_path / "absent", model_name="m", device="cpu")
    with TestClient(create_app(config)) as c:
        code, health = wait_for_health(c)
    assert code == 500
    assert "onnx/model.onnx" in health["error"]


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", [CPU_PROVIDER], [CPU_PROVIDER]),
        ("auto", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
        ("cpu", [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER]),
        ("cuda", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
    ],
)
def test_select_providers(device: Any, available: list[str], expected: list[str]) -> None:
    assert select_providers(device, available) == expected


def test_select_providers_never_falls_back_from_cuda() -> None:
    with pytest.raises(ModelLoadError, match=r"GANTRY_DEVICE=cuda.*CUDAExecutionProvider"):
        select_providers("cuda", ["AzureExecutionProvider", CPU_PROVIDER])


def test_config_from_env_defaults_and_errors() -> None:
    config = Config.from_env({"MODEL_PATH": "/srv/models/minilm/"})
    assert (config.model_path, config.model_name) == (Path("/srv/models/minilm"), "minilm")
    assert (config.host, config.port, config.device, config.max_inputs) == (
        "0.0.0.0",
        8080,
        "auto",
        256,
    )
    named = Config.from_env({"MODEL_NAME": "m", "PORT": "9000", "GANTRY_DEVICE": "CUDA"})
    assert (named.model_path, named.model_name, named.port, named.device) == (
        Path("/models"),
        "m",
        9000,
        "cuda",
    )
    with pytest.raises(ConfigError, match="GANTRY_DEVICE='gpu'"):
        Config.from_env({"GANTRY_DEVICE": "gpu"})
    with pytest.raises(ConfigError, match="PORT='http'"):
        Config.from_env({"PORT": "http"})


RUNTIME_DIR = Path(__file__).resolve().parents[2] / "dockerfiles" / "runtime"


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (RUNTIME_DIR / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [" ".join(ln.split()) for ln in joined.splitlines() if ln.strip()]


def test_dockerfile_builds_on_the_legacy_builder_and_runs_unprivileged() -> None:
    instructions = dockerfile_instructions()
    text = "\n".join(instructions)
    # docker-py's images.build on Docker 20.10 has no BuildKit.
    for buildkit_only in ("--mount", "<<", "--chmod", "--link", "# syntax"):
        assert buildkit_only not in text
    assert not any(i.startswith("ADD ") for i in instructions)
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert froms == [
        "FROM python:3.11-slim-bookworm AS builder",
        "FROM python:3.11-slim-bookworm AS runtime",
        "FROM runtime AS production",
    ]
    production = instructions[instructions.index(froms[2]) :]
    assert "USER 10001:10001" in production
    assert 'ENTRYPOINT ["python", "-m", "gantry_runtime"]' in production
    assert any(
        i.startswith("HEALTHCHECK ")
        and i.endswith('CMD ["python", "/app/gantry_runtime/healthcheck.py"]')
        for i in production
    )
    # Code last: a code-only change rebuilds one layer. Only the venv crosses stages.
    assert production[-1] == "COPY server/ /app/"
    assert [i for i in instructions if "--from=" in i] == [
        "COPY --from=builder /opt/venv /opt/venv"
    ]
    assert "--require-hashes" in text and "--no-index" in text


def test_weights_stay_out_of_the_build_context() -> None:
    ignored = (RUNTIME_DIR / ".dockerignore").read_text().split()
    for suffix in ("onnx", "safetensors", "bin", "pt", "gguf"):
        assert f"**/*.{suffix}" in ignored
    assert "**/__pycache__" in ignored
    assert not any(
        "models" in i or ".onnx" in i for i in dockerfile_instructions() if i.startswith("COPY")
    )


def test_requirements_lock_every_direct_dependency_with_hashes() -> None:
    direct = {
        ln.strip().lower()
        for ln in (RUNTIME_DIR / "requirements.in").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert direct == {
        "onnxruntime",
        "tokenizers",
        "numpy",
        "starlette",
        "uvicorn",
        "prometheus-client",
    }
    lock = (RUNTIME_DIR / "requirements.txt").read_text()
    assert "uv pip compile dockerfiles/runtime/requirements.in --generate-hashes" in lock
    pins = [ln for ln in lock.splitlines() if ln and not ln[0].isspace() and not ln.startswith("#")]
    names = {p.split("==")[0] for p in pins}
    assert direct <= names
    for pin in pins:
        assert "==" in pin and pin.endswith("\\"), pin  # exact version, hashes follow
