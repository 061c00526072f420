"""The HTTP app: OpenAI-compatible ``/v1/embeddings`` and ``/v1/models``, ``/health``,
``/metrics``.

The model loads in a background thread so the port opens at once: ``/health`` answers
503 while loading, 200 once serving and 500 (with the reason) if loading failed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

import anyio
import anyio.to_thread
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .model import DEVICES, Device, EmbeddingModel, ModelLoadError

log = logging.getLogger(__name__)

ENDPOINTS = ("/health", "/metrics", "/v1/embeddings", "/v1/models")


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


@dataclass(frozen=True)
class Config:
    """Runtime settings; :meth:`from_env` documents the variables."""

    model_path: Path
    model_name: str
    device: Device = "auto"
    host: str = "0.0.0.0"  # noqa: S104 - a container must listen beyond its loopback
    port: int = 8080
    max_inputs: int = 256
    max_total_chars: int = 1_000_000
    max_body_bytes: int = 16 * 1024 * 1024
    intra_op_threads: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read MODEL_PATH, MODEL_NAME, GANTRY_DEVICE, HOST, PORT, GANTRY_MAX_INPUTS,
        GANTRY_MAX_TOTAL_CHARS, GANTRY_INTRA_OP_THREADS."""
        e = os.environ if env is None else env
        model_path = Path(e.get("MODEL_PATH") or "/models")
        device = (e.get("GANTRY_DEVICE") or "auto").strip().lower()
        if device not in DEVICES:
            raise ConfigError(f"GANTRY_DEVICE={device!r}: use one of {', '.join(DEVICES)}")
        max_chars = _int_env(e, "GANTRY_MAX_TOTAL_CHARS", cls.max_total_chars, 1)
        return cls(
            model_path=model_path,
            model_name=e.get("MODEL_NAME") or model_path.resolve().name or "model",
            device=device,
            host=e.get("HOST") or cls.host,
            port=_int_env(e, "PORT", cls.port, 1),
            max_inputs=_int_env(e, "GANTRY_MAX_INPUTS", cls.max_inputs, 1),
            max_total_chars=max_chars,
            # JSON may escape each character as \uXXXX; leave room for that and the keys.
            max_body_bytes=max(cls.max_body_bytes, 8 * max_chars),
            intra_op_threads=_int_env(e, "GANTRY_INTRA_OP_THREADS", 0, 0),
        )


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, status: int = 400) -> NoReturn:
    raise ApiError(status, message, param=param)


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A validated ``POST /v1/embeddings`` body."""

    texts: list[str]
    encoding_format: Literal["float", "base64"]
    dimensions: int | None


def parse_embeddings_request(body: Any, config: Config) -> EmbeddingsRequest:
    """Validate a decoded JSON body; raises :class:`ApiError` naming the bad field.

    ``model`` may name anything: one runtime serves one model, and clients often hard-code
    a name (the answer carries the served one). Unknown fields such as ``user`` are ignored.
    """
    if not isinstance(body, dict):
        _bad("the request body must be a JSON object")
    if "input" not in body:
        _bad("'input' is required", "input")
    raw = body["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        texts = cast(list[str], raw)
    elif isinstance(raw, list) and raw and all(isinstance(t, int | list) for t in raw):
        # OpenAI token arrays are tiktoken ids, meaningless to this model's tokenizer.
        _bad("token arrays are not supported by this model; send the text instead", "input")
    else:
        _bad("'input' must be a string or an array of strings", "input")
    if not texts:
        _bad("'input' must not be an empty array", "input")
    if len(texts) > config.max_inputs:
        _bad(f"{len(texts)} inputs exceed the limit of {config.max_inputs}", "input", 413)
    for i, text in enumerate(texts):
        if not text:
            _bad(f"input[{i}] is an empty string", "input")
    total = sum(map(len, texts))
    if total > config.max_total_chars:
        _bad(f"{total} characters exceed the limit of {config.max_total_chars}", "input", 413)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        _bad("'model' must be a string", "model")
    raw_fmt = body.get("encoding_format")
    if raw_fmt not in (None, "float", "base64"):
        _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    fmt: Literal["float", "base64"] = "base64" if raw_fmt == "base64" else "float"
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        _bad("'dimensions' must be a positive integer", "dimensions")
    return EmbeddingsRequest(texts=texts, encoding_format=fmt, dimensions=dims)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (one per app instance)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "gantry_runtime_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gantry_runtime_embeddings_duration_seconds",
            "Time to answer a successful /v1/embeddings request.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.inputs = Counter("gantry_runtime_embeddings_inputs", "Texts embedded.", registry=r)
        self.tokens = Counter("gantry_runtime_embeddings_tokens", "Tokens embedded.", registry=r)
        self.loaded = Gauge("gantry_runtime_model_loaded", "1 once the model serves.", registry=r)
        self.load_seconds = Gauge(
            "gantry_runtime_model_load_seconds", "Time the model took to load.", registry=r
        )
        self.info = Info("gantry_runtime_model", "The served model and its provider.", registry=r)


class ModelState:
    """Loading → ok | error, written once by the loader thread."""

    def __init__(self, config: Config, loader: Callable[[Config], EmbeddingModel]) -> None:
        self._config = config
        self._loader = loader
        self._lock = threading.Lock()
        self.status: Literal["loading", "ok", "error"] = "loading"
        self.model: EmbeddingModel | None = None
        self.error: str | None = None

    def load(self, metrics: Metrics) -> None:
        """Run the loader; never raises (the error is kept for /health)."""
        log.info(
            "loading %s from %s (device=%s)",
            self._config.model_name,
            self._config.model_path,
            self._config.device,
        )
        try:
            model = self._loader(self._config)
        except Exception as e:
            error = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
            log.exception("model failed to load: %s", error)
            with self._lock:
                self.status, self.error = "error", error
            return
        with self._lock:
            self.status, self.model = "ok", model
        metrics.loaded.set(1)
        metrics.load_seconds.set(model.load_seconds)
        metrics.info.info(
            {"model": self._config.model_name, "provider": model.provider, "device": model.device}
        )
        log.info(
            "model loaded in %.2fs on %s (providers %s), %d dimensions",
            model.load_seconds,
            model.provider,
            model.providers,
            model.dimensions,
        )

    def snapshot(self) -> tuple[str, EmbeddingModel | None, str | None]:
        """Status, model and error, read together."""
        with self._lock:
            return self.status, self.model, self.error

    def ready(self) -> EmbeddingModel:
        """The model, or the :class:`ApiError` to answer while there is none."""
        with self._lock:
            if self.model is not None:
                return self.model
            if self.status == "loading":
                raise ApiError(
                    503,
                    "the model is still loading; retry shortly",
                    type="server_error",
                    code="model_loading",
                    headers={"Retry-After": "5"},
                )
            raise ApiError(
                500,
                f"the model failed to load: {self.error}",
                type="server_error",
                code="model_load_failed",
            )


def _default_loader(config: Config) -> EmbeddingModel:
    return EmbeddingModel.load(config.model_path, config.device, config.intra_op_threads)


class _CountRequests:
    """Counts every HTTP response by endpoint (fixed set, so no label explosion) and status."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self._app, self._counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            self._counter.labels(endpoint=endpoint, status=str(status)).inc()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        _bad(f"the request body exceeds {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            _bad(f"the request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _render(model: EmbeddingModel, req: EmbeddingsRequest, name: str) -> tuple[bytes, int]:
    """Embed and serialise (in a worker thread: both are CPU work)."""
    result = model.embed(req.texts)
    data: list[dict[str, Any]] = []
    for i, vector in enumerate(result.vectors):
        embedding: str | list[float]
        if req.encoding_format == "base64":
            # What the openai client decodes: little-endian float32, base64.
            embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    body = {"object": "list", "data": data, "model": name, "usage": usage}
    return json.dumps(body, separators=(",", ":")).encode(), result.prompt_tokens


def create_app(
    config: Config | None = None,
    *,
    loader: Callable[[Config], EmbeddingModel] = _default_loader,
) -> Starlette:
    """The ASGI app; the model starts loading when the app's lifespan starts."""
    cfg = config if config is not None else Config.from_env()
    metrics = Metrics()
    state = ModelState(cfg, loader)
    created = int(time.time())
    # One inference at a time: ONNX Runtime already spreads one run over every core, and
    # queued requests wait here instead of each holding a worker thread.
    inference = anyio.CapacityLimiter(1)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        threading.Thread(
            target=state.load, args=(metrics,), name="model-loader", daemon=True
        ).start()
        yield

    async def health(_: Request) -> JSONResponse:
        status, m, error = state.snapshot()
        if status == "loading":
            return JSONResponse({"status": "loading", "model": cfg.model_name}, status_code=503)
        if m is None:
            body = {"status": "error", "model": cfg.model_name, "error": error}
            return JSONResponse(body, status_code=500)
        return JSONResponse(
            {
                "status": "ok",
                "model": cfg.model_name,
                "provider": m.provider,
                "providers": m.providers,
                "device": m.device,
                "load_seconds": round(m.load_seconds, 3),
                "dimensions": m.dimensions,
                "max_seq_length": m.max_seq_length,
            }
        )

    async def embed(request: Request) -> tuple[bytes, int, int]:
        raw = await _read_body(request, cfg.max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError:
            _bad("the request body is not valid JSON")
        req = parse_embeddings_request(body, cfg)
        model = state.ready()
        if req.dimensions is not None and req.dimensions != model.dimensions:
            _bad(
                f"this model has {model.dimensions} dimensions and cannot return {req.dimensions}",
                "dimensions",
            )
        payload, tokens = await anyio.to_thread.run_sync(
            _render, model, req, cfg.model_name, limiter=inference
        )
        return payload, len(req.texts), tokens

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        try:
            payload, inputs, tokens = await embed(request)
        except ApiError as e:
            return e.response()
        metrics.latency.observe(time.perf_counter() - started)
        metrics.inputs.inc(inputs)
        metrics.tokens.inc(tokens)
        return Response(payload, media_type="application/json")

    async def models(_: Request) -> JSONResponse:
        entry = {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "gantry"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(_: Request, exc: Exception) -> Response:
        e = cast(HTTPException, exc)
        return ApiError(e.status_code, e.detail).response()

    async def server_error(_: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, so uvicorn logs the traceback.
        return ApiError(500, "internal server error", type="server_error").response()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ],
        middleware=[Middleware(_CountRequests, counter=metrics.requests)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
