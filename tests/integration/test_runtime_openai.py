"""The reference runtime as a real process, called with the real ``openai`` client.

Starts ``python -m gantry_runtime`` the way the image's ENTRYPOINT does (module path,
env configuration, a free port), waits on /health, and calls it as users will. The
process is always stopped, and must exit cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests._model_fixture import (
    DIMENSIONS,
    MODEL_NAME,
    RUNTIME_SERVER_DIR,
    ensure_test_model,
)

pytestmark = pytest.mark.integration

HEALTHCHECK = RUNTIME_SERVER_DIR / "gantry_runtime" / "healthcheck.py"
TEXTS = [
    "A man is eating food.",
    "The stock market fell sharply today.",
    "A man is eating a piece of bread.",
    "Quantum computers use qubits.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running runtime process and where its output goes."""

    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 10 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(model_dir: Path, log_dir: Path, **env: str) -> Server:
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": str(RUNTIME_SERVER_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_PATH": str(model_dir),
        "MODEL_NAME": MODEL_NAME,
        "GANTRY_DEVICE": "cpu",
        **env,
    }
    stdout, stderr = log_dir / f"runtime-{port}.out", log_dir / f"runtime-{port}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gantry_runtime"],
            env=full_env,
            stdout=out,
            stderr=err,
            cwd=log_dir,  # not the repo: the module must come from PYTHONPATH, as in the image
        )
    server = Server(proc, port, stdout, stderr)
    try:
        wait_healthy(server)
    except BaseException:
        server.stop()
        raise
    return server


def wait_healthy(server: Server, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"runtime exited with {server.proc.returncode}\n{server.logs()}")
        try:
            response = httpx.get(f"{server.url}/health", timeout=2, trust_env=False)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code != 503:
            assert response.status_code == 200, f"{response.text}\n{server.logs()}"
            body: dict[str, Any] = response.json()
            return body
        time.sleep(0.1)
    pytest.fail(f"runtime not healthy within {timeout_s}s\n{server.logs()}")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_test_model()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(model_dir, tmp_path_factory.mktemp("runtime"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def sent_bodies() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def client(server: Server, sent_bodies: list[dict[str, Any]]) -> Iterator[OpenAI]:
    # The request type is whatever HTTP library this openai release uses (httpx2 now).
    def record(request: Any) -> None:
        if request.content:
            sent_bodies.append(json.loads(request.content))

    # openai's own default HTTP client, with a hook only to observe what goes on the wire;
    # trust_env=False so a proxy in the environment cannot intercept loopback.
    http = openai.DefaultHttpxClient(event_hooks={"request": [record]}, trust_env=False)
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http) as c:
        yield c


def vectors(response: Any) -> np.ndarray[Any, Any]:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_default_encoding_is_base64_on_the_wire_and_decodes(
    client: OpenAI, sent_bodies: list[dict[str, Any]]
) -> None:
    response = client.embeddings.create(model=MODEL_NAME, input=TEXTS)
    assert sent_bodies[-1]["encoding_format"] == "base64"
    got = vectors(response)
    assert got.shape == (len(TEXTS), DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert response.model == MODEL_NAME
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


def test_float_encoding_matches_default_and_keeps_order(client: OpenAI) -> None:
    default = vectors(client.embeddings.create(model=MODEL_NAME, input=TEXTS))
    floats = vectors(
        client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    )
    np.testing.assert_allclose(floats, default, atol=1e-6)
    singles = np.vstack(
        [vectors(client.embeddings.create(model=MODEL_NAME, input=t)) for t in TEXTS]
    )
    np.testing.assert_allclose(floats, singles, atol=1e-4)
    food, stocks, bread, _ = floats
    assert float(food @ bread) > float(food @ stocks)


def test_dimensions_must_match_the_model(client: OpenAI) -> None:
    ok = client.embeddings.create(model=MODEL_NAME, input="hi", dimensions=DIMENSIONS)
    assert len(ok.data[0].embedding) == DIMENSIONS
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_NAME, input="hi", dimensions=128)
    assert caught.value.status_code == 400
    assert caught.value.param == "dimensions"


def test_models_list(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_concurrent_requests_all_succeed(client: OpenAI) -> None:
    def one(i: int) -> int:
        return len(client.embeddings.create(model=MODEL_NAME, input=[f"text {i}"] * 8).data)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(16))) == [8] * 16


def test_health_and_healthcheck_script(server: Server) -> None:
    health = wait_healthy(server)
    assert health["status"] == "ok"
    assert (health["provider"], health["device"]) == ("CPUExecutionProvider", "cpu")
    assert health["providers"] == ["CPUExecutionProvider"]
    # The image runs the probe as a script, with nothing but the standard library.
    probe = [sys.executable, "-I", str(HEALTHCHECK)]
    ok = subprocess.run(probe, env={"PORT": str(server.port)}, capture_output=True, timeout=10)
    assert ok.returncode == 0, ok.stdout
    down = subprocess.run(probe, env={"PORT": str(free_port())}, capture_output=True, timeout=10)
    assert down.returncode == 1
    assert b"unhealthy" in down.stdout


def test_logs_go_to_stdout_and_sigterm_exits_cleanly(model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir, tmp_path)
    try:
        httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}, trust_env=False)
    finally:
        code = server.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete (exit 143 in Docker).
    assert code in (0, -signal.SIGTERM), server.logs()
    out = server.stdout.read_text()
    assert "Finished server process" in out
    assert "model loaded in" in out
    assert '"POST /v1/embeddings HTTP/1.1" 200' in out
    # Successful probes are kept out of the access log; failing ones stay in.
    assert '"GET /health HTTP/1.1" 200' not in out
    assert "Traceback" not in server.logs()
