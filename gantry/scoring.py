"""Scoring a served OpenAI-compatible endpoint: eval sets, scorers, runner, gate, percentiles.

The library under stage `evaluate` (:mod:`gantry.stages.evaluate`), the canary's probes and
the load generator; Prefect-free so it can be unit-tested and reused. Two kinds of eval set
(JSONL):

* embeddings retrieval, ``{"query", "passage", "id"}``: every query's correct passage is its
  own pair's; the corpus is every distinct passage of the set. Scores: top-1 accuracy, MRR.
* chat, ``{"prompt", "expected", "match"}`` with ``match`` one of ``exact`` (stripped
  strings equal), ``contains`` (case-insensitive substring) or ``regex`` (``re.search``);
  missing ``match`` takes the gate metric. Score: accuracy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gantry.errors import (
    EndpointResponseError,
    EndpointUnavailableError,
    EvalSetError,
)
from gantry.spec import EvalOptions
from gantry.tls import tls_context

if TYPE_CHECKING:
    # numpy is imported where vectors are scored, not here: this module is on the path of
    # every `gantry release`, and a re-run that scores nothing should not pay its import.
    import numpy as np
    import numpy.typing as npt

MatchMode = Literal["exact", "contains", "regex"]
EMBEDDING_METRICS = ("top1", "mrr")
CHAT_METRICS = ("exact", "contains", "regex")
#: Passages/queries per /v1/embeddings request: well under the runtime's 256-input limit.
EMBED_BATCH = 32
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# --- eval sets ---------------------------------------------------------------------------


class RetrievalItem(BaseModel):
    """One embeddings retrieval pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    query: str = Field(min_length=1)
    passage: str = Field(min_length=1)
    id: str = Field(min_length=1)


class ChatItem(BaseModel):
    """One chat prompt and its expected answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str = Field(min_length=1)
    expected: str = Field(min_length=1)
    match: MatchMode | None = None


def _load(path: Path, model: type[M]) -> list[M]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalSetError(
            f"eval set {path} does not exist",
            fix="set evaluate.dataset to a JSONL file (relative to the project root, or "
            "absolute), e.g. examples/eval/minilm-retrieval.jsonl",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalSetError(f"cannot read eval set {path}: {exc}") from None
    fields = ", ".join(model.model_fields)
    items: list[M] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not items
        try:
            items.append(model.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(line)"
            raise EvalSetError(
                f"{path}:{number}: {where}: {first['msg']}",
                fix=f"make line {number} one JSON object with the fields {fields}",
            ) from None
    if not items:
        raise EvalSetError(
            f"eval set {path} holds no items",
            fix=f"add JSONL lines with the fields {fields}, or unset evaluate.dataset",
        )
    return items


def load_retrieval_set(path: Path) -> list[RetrievalItem]:
    """Read an embeddings retrieval set; ids must be unique."""
    items = _load(path, RetrievalItem)
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise EvalSetError(
                f"{path}: id {item.id!r} of item {i + 1} repeats item {seen[item.id] + 1}",
                fix="give every pair a unique id",
            )
        seen[item.id] = i
    return items


def load_chat_set(path: Path) -> list[ChatItem]:
    """Read a chat set; regex patterns must compile."""
    items = _load(path, ChatItem)
    for i, item in enumerate(items):
        if item.match == "regex":
            try:
                re.compile(item.expected)
            except re.error as exc:
                raise EvalSetError(
                    f"{path}: item {i + 1}: `expected` is not a valid regex: {exc}",
                    fix="fix the pattern (Python `re` syntax), or use match `contains`",
                ) from None
    return items


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- scorers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalScores:
    """Top-1 accuracy, MRR and each query's 1-based rank of its correct passage."""

    top1: float
    mrr: float
    ranks: tuple[int, ...]
    best: tuple[int, ...]  # corpus index ranked first for each query


def cosine_matrix(a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]]) -> Any:
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    import numpy as np

    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return an @ bn.T


def retrieval_scores(
    queries: npt.NDArray[np.floating[Any]],
    corpus: npt.NDArray[np.floating[Any]],
    correct: Sequence[int],
) -> RetrievalScores:
    """Rank ``corpus`` for each query by cosine similarity; ``correct[i]`` is query i's answer.

    Ties count against the query (rank = 1 + passages scoring >= the correct one, itself
    excluded): a collapsed model giving every text the same vector (or NaNs) must score 0,
    not 1.
    """
    import numpy as np

    # A broken model's NaN similarities rank last instead of comparing False everywhere.
    sims = np.nan_to_num(cosine_matrix(queries, corpus), nan=-np.inf)
    idx = np.arange(len(correct))
    right = sims[idx, np.asarray(correct)]
    ranks = (sims >= right[:, None]).sum(axis=1)  # includes the correct passage itself
    top1 = float(np.mean(ranks == 1))
    mrr = float(np.mean(1.0 / ranks))
    best = np.argmax(sims, axis=1)
    return RetrievalScores(
        top1=top1,
        mrr=mrr,
        ranks=tuple(int(r) for r in ranks),
        best=tuple(int(b) for b in best),
    )


def matches(answer: str, expected: str, mode: MatchMode) -> bool:
    """Whether a chat answer matches: exact (stripped), contains (any case), or regex."""
    if mode == "exact":
        return answer.strip() == expected.strip()
    if mode == "contains":
        return expected.strip().casefold() in answer.casefold()
    return re.search(expected, answer) is not None


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    """Linear-interpolated percentiles of ``values`` (0.0 each for an empty sequence)."""
    import numpy as np

    if not values:
        return [0.0 for _ in qs]
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), list(qs))]


# --- gate --------------------------------------------------------------------------------


class GateVerdict(BaseModel):
    """The gate's decision and why."""

    model_config = ConfigDict(frozen=True)
    passed: bool
    metric: str
    score: float
    threshold: float
    champion_score: float | None
    tolerance: float
    reasons: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        champion = "none" if self.champion_score is None else f"{self.champion_score:.4f}"
        head = (
            f"{self.metric} {self.score:.4f} (threshold {self.threshold:.4f}, champion {champion})"
        )
        return f"{head}: {'; '.join(self.reasons)}" if self.reasons else f"{head}: passed"


def gate(score: float, options: EvalOptions, champion_score: float | None = None) -> GateVerdict:
    """Fail under the threshold, or more than ``tolerance`` below the champion's score."""
    reasons = []
    if score < options.threshold:
        reasons.append(f"score {score:.4f} is under the threshold {options.threshold:.4f}")
    if champion_score is not None and score < champion_score - options.tolerance:
        reasons.append(
            f"score {score:.4f} regresses from the champion's {champion_score:.4f} by "
            f"{champion_score - score:.4f}, beyond the tolerance {options.tolerance:.4f}"
        )
    return GateVerdict(
        passed=not reasons,
        metric=options.metric,
        score=score,
        threshold=options.threshold,
        champion_score=champion_score,
        tolerance=options.tolerance,
        reasons=tuple(reasons),
    )


# --- runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerConfig:
    """How requests are sent: ``attempts`` per request, backoff doubling from ``backoff_s``."""

    model: str
    concurrency: int = 4
    timeout_s: float = 30
    attempts: int = 4
    backoff_s: float = 0.5
    #: Chat: the most tokens one answer may take (None: the server's default).
    max_tokens: int | None = None
    #: Only for tests: an in-process transport (e.g. httpx.MockTransport) instead of TCP.
    transport: httpx.AsyncBaseTransport | None = None
    #: Sent with every request (the canary routes its probes to one server by header).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """Scores, per-item rows and request timings of one evaluation run."""

    scores: dict[str, float]
    rows: list[dict[str, Any]]
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else 0.0


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


async def _with_retries(
    cfg: RunnerConfig, url: str, call: Callable[[], Awaitable[T]]
) -> tuple[T, float]:
    """Run ``call`` (one HTTP exchange); its result and latency in ms.

    Connection failures, timeouts, 429 and 5xx are retried with backoff (a container that
    is still loading answers 503); after ``attempts`` they become EndpointUnavailableError,
    so an unreachable endpoint never turns into a score of 0.
    """
    last = ""
    for attempt in range(cfg.attempts):
        if attempt:
            await asyncio.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        t0 = time.perf_counter()
        try:
            result = await call()
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            continue
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            if status in _RETRY_STATUS:
                last = f"HTTP {status}"
                continue
            raise EndpointResponseError(
                f"{url} refused the request with HTTP {status}: {exc.response.text[:300]}",
                fix="check that runtime.protocol and runtime.served_model_name match the "
                "served model",
            ) from None
        return result, (time.perf_counter() - t0) * 1000
    raise EndpointUnavailableError(
        f"{url} did not answer after {cfg.attempts} attempts ({last}); no quality verdict "
        "was reached",
        fix="check that the model server is running and healthy at that URL (its /health), "
        "or raise evaluate.timeout_s if it is merely slow",
    )


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also from a thread that already runs an event loop
    (as a Prefect task may)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest; a fresh thread has no loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _gather_bounded(n: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``jobs`` with at most ``n`` in flight; the first failure cancels the rest."""
    sem = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await job()

    tasks = [asyncio.ensure_future(one(j)) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _client(cfg: RunnerConfig, base_url: str) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must not sit between us and the
    # endpoint under test (it is usually a local container) and skew latencies.
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=cfg.timeout_s,
        trust_env=False,
        limits=httpx.Limits(max_connections=cfg.concurrency),
        transport=cfg.transport,
        headers=dict(cfg.headers),
        verify=tls_context(),
    )


def _v1(base_url: str, path: str) -> str:
    """``path`` under /v1, whether or not ``base_url`` already ends in /v1."""
    return path if base_url.rstrip("/").endswith("/v1") else f"/v1{path}"


def embeddings_request(model: str, texts: Sequence[str]) -> dict[str, Any]:
    """The body of one embeddings request. base64, as the OpenAI client itself asks: a
    quarter of the bytes of a float list, decoded without a JSON float parse on either
    side (the eval runner shares the CPU with the server it measures)."""
    return {"model": model, "input": list(texts), "encoding_format": "base64"}


def _embedding(value: Any) -> npt.NDArray[np.float32]:
    import numpy as np

    # A server that ignores encoding_format answers a float list: take that too.
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def _vectors(body: Any, n: int, url: str) -> npt.NDArray[np.float32]:
    import numpy as np

    try:
        data = sorted(body["data"], key=lambda d: d["index"])
        out = np.asarray([_embedding(d["embedding"]) for d in data], dtype=np.float32)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise EndpointResponseError(
            f"{url} answered an embeddings body that is not OpenAI's shape ({exc!r})",
            fix="set runtime.protocol to the protocol the model server speaks",
        ) from None
    if out.ndim != 2 or out.shape[0] != n:
        raise EndpointResponseError(
            f"{url} answered {out.shape[0] if out.ndim else 0} embeddings for {n} inputs",
            fix="check the model server: one embedding per input is the protocol",
        )
    return out


def embedding_batches(
    items: Sequence[RetrievalItem], batch: int = EMBED_BATCH
) -> tuple[list[str], list[list[str]]]:
    """The distinct passages (the corpus), and the inputs of each embeddings request: the
    corpus, then the queries, ``batch`` texts a request."""
    corpus = list(dict.fromkeys(item.passage for item in items))  # shared passages once
    texts = corpus + [item.query for item in items]
    return corpus, [texts[i : i + batch] for i in range(0, len(texts), batch)]


async def run_embeddings(
    base_url: str, items: Sequence[RetrievalItem], cfg: RunnerConfig, batch: int = EMBED_BATCH
) -> RunOutcome:
    """Embed the corpus and the queries in batches, concurrently; score retrieval."""
    corpus, chunks = embedding_batches(items, batch)
    where = {p: i for i, p in enumerate(corpus)}
    path = _v1(base_url, "/embeddings")
    latencies: list[float] = []
    async with _client(cfg, base_url) as http:

        def job(chunk: list[str]) -> Callable[[], Awaitable[npt.NDArray[np.float32]]]:
            async def send() -> Any:
                r = await http.post(path, json=embeddings_request(cfg.model, chunk))
                r.raise_for_status()
                return r.json()

            async def run() -> npt.NDArray[np.float32]:
                body, ms = await _with_retries(cfg, base_url, send)
                latencies.append(ms)
                return _vectors(body, len(chunk), base_url)

            return run

        t0 = time.perf_counter()
        parts = await _gather_bounded(cfg.concurrency, [job(c) for c in chunks])
        wall = time.perf_counter() - t0
    import numpy as np

    vectors = np.concatenate(parts)
    correct = [where[item.passage] for item in items]
    s = retrieval_scores(vectors[len(corpus) :], vectors[: len(corpus)], correct)
    ids_by_passage = {item.passage: item.id for item in reversed(items)}
    rows = [
        {
            "id": item.id,
            "query": item.query,
            "rank": rank,
            "top1": rank == 1,
            "reciprocal_rank": round(1 / rank, 6),
            "retrieved_id": ids_by_passage[corpus[best]],
        }
        for item, rank, best in zip(items, s.ranks, s.best, strict=True)
    ]
    return RunOutcome({"top1": s.top1, "mrr": s.mrr}, rows, latencies, [], wall)


async def _stream_chat(
    http: httpx.AsyncClient, path: str, cfg: RunnerConfig, prompt: str
) -> tuple[str, float | None]:
    """One streamed chat completion: the answer and ms to its first content token."""
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
    }
    if cfg.max_tokens is not None:
        body["max_tokens"] = cfg.max_tokens
    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    async with http.stream("POST", path, json=body) as r:
        if r.status_code >= 400:
            await r.aread()
            r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # SSE comments, event names, keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
            except (ValueError, KeyError, IndexError, AttributeError, TypeError):
                continue  # e.g. a usage-only chunk with no choices
            if delta:
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1000
                parts.append(delta)
    return "".join(parts), ttft


async def run_chat(
    base_url: str, items: Sequence[ChatItem], cfg: RunnerConfig, default_match: MatchMode
) -> RunOutcome:
    """Stream one completion per prompt, concurrently; accuracy, latency and TTFT."""
    path = _v1(base_url, "/chat/completions")
    latencies: list[float] = []
    ttfts: list[float] = []
    async with _client(cfg, base_url) as http:

        def job(i: int, item: ChatItem) -> Callable[[], Awaitable[dict[str, Any]]]:
            async def run() -> dict[str, Any]:
                (answer, ttft), ms = await _with_retries(
                    cfg, base_url, lambda: _stream_chat(http, path, cfg, item.prompt)
                )
                latencies.append(ms)
                if ttft is not None:
                    ttfts.append(ttft)
                mode = item.match or default_match
                return {
                    "index": i,
                    "prompt": item.prompt,
                    "expected": item.expected,
                    "match": mode,
                    "answer": answer,
                    "correct": matches(answer, item.expected, mode),
                    "latency_ms": round(ms, 3),
                    "ttft_ms": None if ttft is None else round(ttft, 3),
                }

            return run

        t0 = time.perf_counter()
        rows = await _gather_bounded(cfg.concurrency, [job(i, it) for i, it in enumerate(items)])
        wall = time.perf_counter() - t0
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    return RunOutcome({"accuracy": accuracy}, rows, latencies, ttfts, wall)
