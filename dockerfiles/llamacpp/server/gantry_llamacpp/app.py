"""llama-cpp-python's OpenAI-compatible server behind a readiness gate and Prometheus metrics.

The port opens at once; the GGUF is checked (:mod:`.gguf`) and loaded in a background
thread. ``/health`` answers 503 while loading, 200 once llama.cpp serves, and 500 with
the reason when the file or the load failed; ``/v1/*`` answers OpenAI-shaped 503/500 errors
until then and is handed to llama-cpp-python's own app afterwards. ``/metrics`` counts
requests, prompt and completion tokens and measures the time to the first streamed token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .gguf import GGUFError, GGUFInfo, find_model, inspect

log = logging.getLogger(__name__)

#: Endpoints measured by name; anything else is counted as "other" (bounded labels).
ENDPOINTS = ("/health", "/metrics", "/v1/chat/completions", "/v1/completions", "/v1/models")
GENERATION = ("/v1/chat/completions", "/v1/completions")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ConfigError(ValueError):
    """An environment variable has a value the runtime cannot use."""


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def cpu_quota(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this container may use: its cgroup quota rounded up, else the machine's count.

    llama.cpp's default (half the host's cores) ignores `docker run --cpus`, and threads
    beyond the quota only queue behind each other.
    """
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """Runtime settings; :meth:`from_env` documents the variables."""

    model_path: Path
    model_name: str
    model_file: str | None = None
    host: str = "0.0.0.0"  # noqa: S104 - a container must listen beyond its loopback
    port: int = 8080
    n_ctx: int = 2048
    n_threads: int = 1
    n_gpu_layers: int = 0
    chat_format: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read MODEL_PATH, MODEL_FILE, MODEL_NAME, HOST, PORT, N_CTX, N_THREADS,
        N_GPU_LAYERS (-1: all) and CHAT_FORMAT (empty: the GGUF's own chat template)."""
        e = os.environ if env is None else env
        model_path = Path(e.get("MODEL_PATH") or "/models")
        return cls(
            model_path=model_path,
            model_name=e.get("MODEL_NAME") or model_path.resolve().name or "model",
            model_file=e.get("MODEL_FILE") or None,
            host=e.get("HOST") or cls.host,
            port=_int_env(e, "PORT", cls.port, 1),
            n_ctx=_int_env(e, "N_CTX", cls.n_ctx, 64),
            n_threads=_int_env(e, "N_THREADS", cpu_quota(), 1),
            n_gpu_layers=_int_env(e, "N_GPU_LAYERS", 0, -1),
            chat_format=e.get("CHAT_FORMAT") or None,
        )


class Metrics:
    """The runtime's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter(
            "gantry_runtime_requests", "HTTP responses.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "gantry_runtime_request_seconds",
            "Request start to the last byte of the response.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gantry_runtime_ttft_seconds",
            "Request start to the first streamed content token.",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gantry_runtime_prompt_tokens", "Prompt tokens (from usage).", registry=r
        )
        self.completion_tokens = Counter(
            "gantry_runtime_completion_tokens",
            "Generated tokens: usage.completion_tokens, or one per streamed content chunk.",
            registry=r,
        )
        self.in_flight = Gauge(
            "gantry_runtime_requests_in_flight", "Generation requests being served.", registry=r
        )
        self.loaded = Gauge("gantry_runtime_model_loaded", "1 once the model serves.", registry=r)
        self.load_seconds = Gauge(
            "gantry_runtime_model_load_seconds", "Time the model took to load.", registry=r
        )
        self.info = Info("gantry_runtime_model", "The served model.", registry=r)


@dataclass(frozen=True)
class Loaded:
    """A model that serves: llama-cpp-python's app and what /health reports."""

    app: ASGIApp
    gguf: GGUFInfo
    file: Path
    device: Literal["cpu", "gpu"]
    load_seconds: float


Loader = Callable[[Config, Path, GGUFInfo], tuple[ASGIApp, Literal["cpu", "gpu"]]]


def llama_loader(
    config: Config, path: Path, info: GGUFInfo
) -> tuple[ASGIApp, Literal["cpu", "gpu"]]:
    """llama-cpp-python's FastAPI app with the model loaded (imported here: seconds)."""
    import llama_cpp
    from llama_cpp.server.app import create_app as create_llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(
        model=str(path),
        model_alias=config.model_name,
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        n_threads_batch=config.n_threads,
        n_gpu_layers=config.n_gpu_layers,
        chat_format=config.chat_format,
        verbose=False,
    )
    # interrupt_requests (on by default) ends a streaming answer with [DONE] as soon as
    # another request waits for the model: every concurrent client but the last would get
    # a cut (often empty) answer. Requests queue for the model instead.
    server = ServerSettings(host=config.host, port=config.port, interrupt_requests=False)
    app: ASGIApp = create_llama_app(server_settings=server, model_settings=[model])
    gpu = config.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
    return app, "gpu" if gpu else "cpu"


class LoadState:
    """Loading → ok | error, written once by the loader thread."""

    def __init__(self, config: Config, loader: Loader) -> None:
        self._config, self._loader = config, loader
        self._lock = threading.Lock()
        self.status: Literal["loading", "ok", "error"] = "loading"
        self.loaded: Loaded | None = None
        self.error: str | None = None

    def load(self, metrics: Metrics) -> None:
        """Check and load the GGUF; never raises (the error is kept for /health)."""
        t0 = time.monotonic()
        try:
            path = find_model(self._config.model_path, self._config.model_file)
            info = inspect(path)
            log.info(
                "loading %s (%s, %d tensors, %.1f MiB) as %r with %d threads",
                path,
                info.architecture,
                info.tensor_count,
                info.file_size / 2**20,
                self._config.model_name,
                self._config.n_threads,
            )
            app, device = self._loader(self._config, path, info)
        except GGUFError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # llama.cpp's own reasons go to stderr; keep its message
            self._fail(f"llama.cpp could not load the model: {type(exc).__name__}: {exc}")
            return
        loaded = Loaded(app, info, path, device, time.monotonic() - t0)
        with self._lock:
            self.status, self.loaded = "ok", loaded
        metrics.loaded.set(1)
        metrics.load_seconds.set(loaded.load_seconds)
        metrics.info.info(
            {
                "model": self._config.model_name,
                "file": path.name,
                "architecture": info.architecture,
                "device": device,
            }
        )
        log.info("model loaded in %.2fs on %s", loaded.load_seconds, device)

    def _fail(self, error: str) -> None:
        log.error("model failed to load: %s", error)
        with self._lock:
            self.status, self.error = "error", error

    def snapshot(self) -> tuple[str, Loaded | None, str | None]:
        """Status, model and error, read together."""
        with self._lock:
            return self.status, self.loaded, self.error


async def _json(
    send: Send, status: int, body: object, headers: Mapping[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class StreamMeter:
    """Reads a generation response as it passes: SSE events or one JSON body.

    Finds the first content token (TTFT) and counts tokens: ``usage`` when the body has
    it, else one per streamed chunk with content (llama-cpp-python streams one token per
    chunk; it holds back only partial UTF-8 and stop-sequence prefixes).
    """

    def __init__(self) -> None:
        self.streaming = False
        self.first_token_at: float | None = None
        self.chunks_with_content = 0
        self.prompt_tokens = 0
        self.completion_tokens: int | None = None
        self._buffer = b""
        self._body = b""

    def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        self.streaming = ctype.startswith(b"text/event-stream")

    def feed(self, chunk: bytes, now: float) -> None:
        if not self.streaming:
            self._body += chunk
            return
        self._buffer += chunk
        # SSE events end with a blank line; sse-starlette writes \r\n line endings.
        while True:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
            event, sep, rest = self._buffer.partition(b"\n\n")
            if not sep:
                return
            self._buffer = rest
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip(), now)

    def _event(self, data: bytes, now: float) -> None:
        if not data or data == b"[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if _has_content(payload):
            self.chunks_with_content += 1
            if self.first_token_at is None:
                self.first_token_at = now
        self._usage(payload)

    def finish(self) -> None:
        if not self.streaming and self._body:
            with contextlib.suppress(ValueError):  # an error page, not JSON: no usage
                self._usage(json.loads(self._body))

    def _usage(self, payload: Any) -> None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    @property
    def tokens(self) -> int:
        return (
            self.completion_tokens
            if self.completion_tokens is not None
            else (self.chunks_with_content)
        )


def _has_content(payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
        if choice.get("text"):
            return True
    return False


def create_app(
    config: Config, *, loader: Loader = llama_loader, metrics: Metrics | None = None
) -> ASGIApp:
    """The ASGI app: health, metrics, and llama-cpp-python's routes once loaded."""
    metrics = metrics or Metrics()
    state = LoadState(config, loader)
    started = threading.Event()

    def start_loading() -> None:
        if not started.is_set():
            started.set()
            threading.Thread(
                target=state.load, args=(metrics,), name="model-loader", daemon=True
            ).start()

    async def health(send: Send) -> None:
        status, loaded, error = state.snapshot()
        if loaded is not None:
            info = loaded.gguf
            await _json(
                send,
                200,
                {
                    "status": "ok",
                    "model": config.model_name,
                    "provider": "llama.cpp",
                    "device": loaded.device,
                    "file": loaded.file.name,
                    "architecture": info.architecture,
                    "context_length": info.metadata.get(f"{info.architecture}.context_length"),
                    "n_ctx": config.n_ctx,
                    "n_threads": config.n_threads,
                    "load_seconds": round(loaded.load_seconds, 3),
                },
            )
        elif status == "loading":
            await _json(send, 503, {"status": "loading", "model": config.model_name})
        else:
            await _json(send, 500, {"status": "error", "model": config.model_name, "error": error})

    async def not_ready(send: Send) -> None:
        status, _, error = state.snapshot()
        if status == "loading":
            body = {"message": "the model is still loading; retry shortly", "code": "model_loading"}
            await _json(
                send, 503, {"error": {**body, "type": "server_error"}}, {"Retry-After": "5"}
            )
        else:
            message = f"the model failed to load: {error}"
            body = {"message": message, "code": "model_load_failed", "type": "server_error"}
            await _json(send, 500, {"error": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Loading starts with the server, not at import, so tests can build apps freely.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    start_loading()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        start_loading()  # servers run without lifespan too
        path: str = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        t0 = time.monotonic()
        status_code = 500
        meter = StreamMeter() if path in GENERATION else None

        async def measuring_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
                if meter is not None:
                    meter.start(list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and meter is not None:
                meter.feed(message.get("body", b""), time.monotonic())
            await send(message)

        if meter is not None:
            metrics.in_flight.inc()
        try:
            if path == "/health":
                await health(measuring_send)
            elif path == "/metrics":
                await _metrics(measuring_send, metrics)
            else:
                _, loaded, _ = state.snapshot()
                if loaded is None:
                    await not_ready(measuring_send)
                else:
                    await loaded.app(scope, receive, measuring_send)
        finally:
            metrics.requests.labels(endpoint, str(status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
            if meter is not None:
                metrics.in_flight.dec()
                meter.finish()
                if status_code == 200:
                    if meter.first_token_at is not None:
                        metrics.ttft.labels(endpoint).observe(meter.first_token_at - t0)
                    metrics.prompt_tokens.inc(meter.prompt_tokens)
                    metrics.completion_tokens.inc(meter.tokens)

    return app


async def _metrics(send: Send, metrics: Metrics) -> None:
    data = generate_latest(metrics.registry)
    headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})
