"""The llama.cpp runtime's own code, in-process: the GGUF check, the readiness gate, the
stream meter behind the TTFT histogram. llama.cpp itself runs in
tests/integration/test_llamacpp_runtime.py (the real image, the real model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from gantry_llamacpp.app import Config, ConfigError, StreamMeter, cpu_quota, create_app
from gantry_llamacpp.gguf import GGUFError, GGUFInfo, find_model, inspect
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

pytestmark = pytest.mark.unit


def write_gguf(path: Path) -> Path:
    """A small GGUF written by llama.cpp's own writer (the `gguf` package)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_inspect_reads_a_whole_gguf(tmp_path: Path) -> None:
    info = inspect(write_gguf(tmp_path / "m.gguf"))
    assert (info.architecture, info.name, info.tensor_count) == ("llama", "tiny-test", 2)
    assert info.metadata["llama.context_length"] == 128
    # The two F32 tensors end where the file ends (modulo the writer's padding).
    assert info.data_end <= info.file_size < info.data_end + 32


def test_inspect_names_a_truncated_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(GGUFError, match=r"m\.gguf is truncated: its tensors end at byte \d+"):
        inspect(path)
    path.write_bytes(data[:30])  # cut inside the header
    with pytest.raises(GGUFError, match="ends inside its GGUF header"):
        inspect(path)


def test_inspect_refuses_what_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(GGUFError, match=r"not a GGUF file \(it starts with b'PK"):
        inspect(path)
    path.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFError, match="GGUF version 99"):
        inspect(path)


def test_find_model(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        find_model(tmp_path / "missing")
    with pytest.raises(GGUFError, match=r"no \*\.gguf file"):
        find_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert find_model(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(GGUFError, match="several GGUF files.*set MODEL_FILE"):
        find_model(tmp_path)
    assert find_model(tmp_path, "b.gguf") == tmp_path / "b.gguf"


def test_config_from_env_and_cpu_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cpu_quota(cpu_max) == 2  # 1.5 CPUs: two threads
    cpu_max.write_text("max 100000\n")
    assert cpu_quota(cpu_max) >= 1
    c = Config.from_env({"MODEL_PATH": "/m", "MODEL_NAME": "chat", "N_THREADS": "3"})
    assert (c.model_name, c.n_threads, c.n_ctx, c.n_gpu_layers) == ("chat", 3, 2048, 0)
    with pytest.raises(ConfigError, match="N_CTX='lots' is not an integer"):
        Config.from_env({"N_CTX": "lots"})


def sse(*events: object) -> list[bytes]:
    return [f"data: {json.dumps(e)}\r\n\r\n".encode() for e in events] + [b"data: [DONE]\r\n\r\n"]


def chunk(content: str | None = None, role: str | None = None) -> dict[str, object]:
    delta = {k: v for k, v in (("content", content), ("role", role)) if v is not None}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def test_stream_meter_finds_the_first_token_across_split_chunks() -> None:
    meter = StreamMeter()
    meter.start([(b"content-type", b"text/event-stream; charset=utf-8")])
    body = b"".join(sse(chunk(role="assistant"), chunk("The"), chunk(" answer"), chunk("")))
    # Split at awkward places: inside "data:", inside the JSON, between \r and \n.
    cuts = [3, 17, 60, 61, 62, len(body) - 5]
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for i, piece in enumerate(pieces):
        meter.feed(piece, now=float(i))
    meter.finish()
    assert meter.chunks_with_content == 2
    assert meter.tokens == 2
    # The role-only chunk is not a token: the first content arrives in a later piece.
    assert meter.first_token_at is not None and meter.first_token_at >= 2


def test_stream_meter_reads_usage_of_a_whole_body() -> None:
    meter = StreamMeter()
    meter.start([(b"content-type", b"application/json")])
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}})
    meter.feed(body[:10].encode(), 1.0)
    meter.feed(body[10:].encode(), 2.0)
    meter.finish()
    assert (meter.prompt_tokens, meter.tokens, meter.first_token_at) == (12, 5, None)


def streaming_app(delay_s: float) -> ASGIApp:
    """Answers every request with an SSE stream whose first token comes after ``delay_s``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, piece in enumerate(sse(chunk(role="assistant"), chunk("4"), chunk("."))):
            if i == 1:
                time.sleep(delay_s)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.fixture
def gguf_dir(tmp_path: Path) -> Iterator[Path]:
    write_gguf(tmp_path / "m.gguf")
    yield tmp_path


def test_gate_health_and_ttft_metrics(gguf_dir: Path) -> None:
    loaded: list[GGUFInfo] = []

    def loader(config: Config, path: Path, info: GGUFInfo) -> tuple[ASGIApp, Literal["cpu"]]:
        loaded.append(info)
        return streaming_app(0.05), "cpu"

    config = Config(model_path=gguf_dir, model_name="tiny")
    with TestClient(create_app(config, loader=loader)) as client:
        deadline = time.monotonic() + 10
        while (r := client.get("/health")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.status_code == 200, r.text
        assert r.json() | {"load_seconds": 0} == {
            "status": "ok",
            "model": "tiny",
            "provider": "llama.cpp",
            "device": "cpu",
            "file": "m.gguf",
            "architecture": "llama",
            "context_length": 128,
            "n_ctx": 2048,
            "n_threads": config.n_threads,
            "load_seconds": 0,
        }
        r = client.post("/v1/chat/completions", json={"stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        metrics = client.get("/metrics").text
    assert loaded[0].name == "tiny-test"
    assert 'gantry_runtime_ttft_seconds_count{endpoint="/v1/chat/completions"} 1.0' in metrics
    # The first token came after the 50 ms the app slept: not in the 25 ms bucket.
    assert (
        'gantry_runtime_ttft_seconds_bucket{endpoint="/v1/chat/completions",le="0.025"} 0.0'
        in metrics
    )
    assert "gantry_runtime_completion_tokens_total 2.0" in metrics
    assert (
        'gantry_runtime_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
    )


def test_gate_names_a_bad_file_in_health_and_api(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"<html>404 Not Found</html>")

    def loader(config: Config, path: Path, info: GGUFInfo) -> tuple[ASGIApp, Literal["cpu"]]:
        raise AssertionError("a file that is not GGUF must not reach llama.cpp")

    with TestClient(create_app(Config(model_path=tmp_path, model_name="m"), loader=loader)) as c:
        deadline = time.monotonic() + 10
        while (r := c.get("/health")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.status_code == 500
        assert "m.gguf is not a GGUF file" in r.json()["error"]
        api = c.post("/v1/chat/completions", json={})
    assert api.status_code == 500
    assert api.json()["error"]["code"] == "model_load_failed"
    assert "not a GGUF file" in api.json()["error"]["message"]


def test_gate_answers_503_while_loading(gguf_dir: Path) -> None:
    import threading

    release = threading.Event()

    def slow(config: Config, path: Path, info: GGUFInfo) -> tuple[ASGIApp, Literal["cpu"]]:
        release.wait(10)
        return streaming_app(0), "cpu"

    with TestClient(create_app(Config(model_path=gguf_dir, model_name="m"), loader=slow)) as c:
        r = c.post("/v1/chat/completions", json={})
        assert (r.status_code, r.headers["retry-after"]) == (503, "5")
        assert r.json()["error"]["code"] == "model_loading"
        assert c.get("/health").json() == {"status": "loading", "model": "m"}
        release.set()
