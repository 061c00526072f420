"""Eval sets, scorers, percentiles, the gate, and the runner against in-process transports."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from gantry import scoring as ev
from gantry.errors import EndpointResponseError, EndpointUnavailableError, EvalSetError
from gantry.spec import EvalOptions

pytestmark = pytest.mark.unit

DEMO_SET = Path(__file__).resolve().parents[2] / "examples" / "eval" / "minilm-retrieval.jsonl"


def write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "set.jsonl"
    p.write_text("".join(f"{ln}\n" for ln in lines))
    return p


# --- loader ------------------------------------------------------------------------------


def test_loads_retrieval_set_and_skips_blank_lines(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '{"query": "q1", "passage": "p1", "id": "a"}',
        "",
        '{"query": "q2", "passage": "p2", "id": "b"}',
    )
    items = ev.load_retrieval_set(p)
    assert [i.id for i in items] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", "line 3"),
        ('{"query": "q", "id": "x"}', "passage"),
        ('{"query": "", "passage": "p", "id": "x"}', "query"),
        ('{"query": "q", "passage": "p", "id": "x", "extra": 1}', "extra"),
    ],
)
def test_malformed_line_names_its_number(tmp_path: Path, bad: str, needle: str) -> None:
    ok = '{"query": "q%d", "passage": "p%d", "id": "i%d"}'
    p = write(tmp_path, ok % (1, 1, 1), ok % (2, 2, 2), bad)
    with pytest.raises(EvalSetError) as exc:
        ev.load_retrieval_set(p)
    assert f"{p}:3:" in str(exc.value)
    assert needle in str(exc.value)
    assert "fix: make line 3" in str(exc.value)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", "line 2"),
        ('{"prompt": "What is 2 + 2?"}', "expected"),
        ('{"prompt": "q", "expected": "4", "match": "fuzzy"}', "match"),
    ],
)
def test_malformed_chat_line_names_its_number(tmp_path: Path, bad: str, needle: str) -> None:
    p = write(tmp_path, '{"prompt": "What is 2 + 2?", "expected": "4"}', bad)
    with pytest.raises(EvalSetError) as exc:
        ev.load_chat_set(p)
    assert f"{p}:2:" in str(exc.value) and needle in str(exc.value)
    assert "fix: make line 2 one JSON object with the fields prompt, expected, match" in str(
        exc.value
    )


def test_the_chat_demo_set_is_valid() -> None:
    items = ev.load_chat_set(DEMO_SET.with_name("smollm2-chat.jsonl"))
    assert len(items) == 20 and len({i.prompt for i in items}) == 20


def test_empty_set_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="holds no items"):
        ev.load_retrieval_set(write(tmp_path, "", "  "))


def test_missing_file_names_the_spec_field(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="evaluate.dataset"):
        ev.load_chat_set(tmp_path / "nope.jsonl")


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '{"query": "q1", "passage": "p1", "id": "a"}',
        '{"query": "q2", "passage": "p2", "id": "a"}',
    )
    with pytest.raises(EvalSetError, match="repeats item 1"):
        ev.load_retrieval_set(p)


def test_chat_set_rejects_bad_match_and_bad_regex(tmp_path: Path) -> None:
    p = write(tmp_path, '{"prompt": "p", "expected": "e", "match": "fuzzy"}')
    with pytest.raises(EvalSetError, match=":1: match"):
        ev.load_chat_set(p)
    p = write(tmp_path, '{"prompt": "p", "expected": "(", "match": "regex"}')
    with pytest.raises(EvalSetError, match="not a valid regex"):
        ev.load_chat_set(p)


def test_demo_set_is_big_distinct_and_valid() -> None:
    items = ev.load_retrieval_set(DEMO_SET)
    assert len(items) >= 200
    assert len({i.query for i in items}) == len(items)
    assert len({i.passage for i in items}) == len(items)


# --- scorers -----------------------------------------------------------------------------


def test_retrieval_scores_top1_and_mrr() -> None:
    corpus = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    # q0 → p0 (rank 1); q1 closest to p0, then p1 (rank 2); q2 → p2 but scaled (cosine).
    queries = np.array([[1, 0.1, 0], [0.9, 0.5, 0], [0, 0, 5]], dtype=np.float32)
    s = ev.retrieval_scores(queries, corpus, [0, 1, 2])
    assert s.ranks == (1, 2, 1)
    assert s.best == (0, 0, 2)
    assert s.top1 == pytest.approx(2 / 3)
    assert s.mrr == pytest.approx((1 + 0.5 + 1) / 3)


def test_ties_count_against_the_query() -> None:
    # A collapsed model (every vector the same) must not score a perfect top-1.
    same = np.ones((3, 4), dtype=np.float32)
    s = ev.retrieval_scores(same, same, [0, 1, 2])
    assert s.top1 == 0.0
    assert s.ranks == (3, 3, 3)


def test_nan_vectors_score_zero_not_crash() -> None:
    nan = np.full((2, 3), np.nan, dtype=np.float32)
    s = ev.retrieval_scores(nan, np.eye(2, 3, dtype=np.float32), [0, 1])
    assert s.top1 == 0.0
    assert s.ranks == (2, 2)


@pytest.mark.parametrize(
    ("answer", "expected", "mode", "ok"),
    [
        (" 4\n", "4", "exact", True),
        ("4.", "4", "exact", False),
        ("The answer is PARIS.", "paris", "contains", True),
        ("London", "paris", "contains", False),
        ("It is 42 exactly", r"\b42\b", "regex", True),
        ("It is 420", r"\b42\b", "regex", False),
    ],
)
def test_matches(answer: str, expected: str, mode: ev.MatchMode, ok: bool) -> None:
    assert ev.matches(answer, expected, mode) is ok


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    p50, p95, p99 = ev.percentiles(values)
    assert p50 == pytest.approx(50.5)
    assert p95 == pytest.approx(95.05)
    assert p99 == pytest.approx(99.01)
    assert ev.percentiles([7.0]) == [7.0, 7.0, 7.0]
    assert ev.percentiles([]) == [0.0, 0.0, 0.0]


# --- gate --------------------------------------------------------------------------------


def opts(**kw: float) -> EvalOptions:
    return EvalOptions(dataset="x.jsonl", metric="top1", **kw)


def test_gate_threshold() -> None:
    assert ev.gate(0.80, opts(threshold=0.8), None).passed
    v = ev.gate(0.79, opts(threshold=0.8), None)
    assert not v.passed
    assert "under the threshold 0.8000" in v.message


def test_gate_tolerance_against_champion() -> None:
    o = opts(threshold=0.5, tolerance=0.02)
    assert ev.gate(0.90, o, 0.91).passed  # within tolerance
    assert ev.gate(0.88, o, 0.90).passed  # exactly at the edge
    v = ev.gate(0.87, o, 0.90)
    assert not v.passed
    assert "0.8700" in v.message and "0.9000" in v.message
    assert "beyond the tolerance 0.0200" in v.message
    # Both reasons at once.
    v = ev.gate(0.3, o, 0.9)
    assert len(v.reasons) == 2


# --- runner (in-process transports) ---------------------------------------------------------


def embeddings_handler(request: httpx.Request, *, ignore_format: bool = False) -> httpx.Response:
    """Embeds a text as a one-hot vector of its first character: retrieval by first letter.
    Answers in the encoding asked for, as OpenAI does (or always floats, as some servers)."""
    body = json.loads(request.content)
    data = []
    for i, text in enumerate(body["input"]):
        vec = [0.0] * 26
        vec[ord(text[0].lower()) - ord("a")] = 1.0
        embedding: object = vec
        if body.get("encoding_format") == "base64" and not ignore_format:
            embedding = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return httpx.Response(200, json={"object": "list", "data": data, "model": body["model"]})


@pytest.mark.parametrize("ignore_format", [False, True], ids=["base64", "floats"])
def test_run_embeddings_batches_and_scores(ignore_format: bool) -> None:
    items = [ev.RetrievalItem(query=f"{c} query", passage=f"{c} passage", id=c) for c in "abcdefgh"]
    # A query whose first letter matches another passage: retrieved wrong.
    items.append(ev.RetrievalItem(query="a wrong one", passage="z passage", id="z"))
    handler = functools.partial(embeddings_handler, ignore_format=ignore_format)
    cfg = ev.RunnerConfig(model="m", concurrency=3, transport=httpx.MockTransport(handler))
    out = asyncio.run(ev.run_embeddings("http://test", items, cfg, batch=4))
    assert out.scores["top1"] == pytest.approx(8 / 9)
    assert len(out.latencies_ms) == 5  # 18 texts in batches of 4
    wrong = out.rows[-1]
    assert wrong["id"] == "z" and wrong["retrieved_id"] == "a" and not wrong["top1"]


def test_an_embedding_that_is_not_base64_is_a_clear_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        data = [{"object": "embedding", "index": 0, "embedding": "not base64!"}]
        return httpx.Response(200, json={"object": "list", "data": data})

    items = [ev.RetrievalItem(query="a q", passage="a p", id="a")]
    cfg = ev.RunnerConfig(model="m", concurrency=1, transport=httpx.MockTransport(handler))
    with pytest.raises(EndpointResponseError, match="not OpenAI's shape"):
        asyncio.run(ev.run_embeddings("http://test", items, cfg, batch=1))


def test_retries_transient_status_then_succeeds() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "loading"}})
        return embeddings_handler(request)

    items = [ev.RetrievalItem(query="a q", passage="a p", id="a")]
    cfg = ev.RunnerConfig(
        model="m", backoff_s=0.001, concurrency=1, transport=httpx.MockTransport(handler)
    )
    out = asyncio.run(ev.run_embeddings("http://test", items, cfg))
    assert out.scores["top1"] == 1.0
    assert len(calls) == 3


def test_unreachable_endpoint_raises_after_attempts() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    items = [ev.RetrievalItem(query="a q", passage="a p", id="a")]
    cfg = ev.RunnerConfig(
        model="m", attempts=3, backoff_s=0.001, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(EndpointUnavailableError, match="after 3 attempts"):
        asyncio.run(ev.run_embeddings("http://test", items, cfg))
    assert len(calls) == 3


def test_client_error_is_permanent_and_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(404, json={"error": {"message": "no such model"}})

    items = [ev.RetrievalItem(query="a q", passage="a p", id="a")]
    cfg = ev.RunnerConfig(model="m", transport=httpx.MockTransport(handler))
    with pytest.raises(EndpointResponseError, match="HTTP 404"):
        asyncio.run(ev.run_embeddings("http://test", items, cfg))
    assert len(calls) == 1


def chat_handler(request: httpx.Request) -> httpx.Response:
    """Streams the answer to `what is N + N?` in two chunks, with a comment and [DONE]."""
    assert request.url.path == "/v1/chat/completions"
    body = json.loads(request.content)
    assert body["stream"] is True
    assert body["max_tokens"] == 32  # answers are bounded: a rambling model cannot time out
    prompt = body["messages"][0]["content"]
    n = int(prompt.split()[2])
    chunks = [
        ": keep-alive",
        "data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]}),
        "data: " + json.dumps({"choices": [{"delta": {"content": "It is "}}]}),
        "data: " + json.dumps({"choices": [{"delta": {"content": str(n + n)}}]}),
        "data: " + json.dumps({"choices": [], "usage": {"total_tokens": 3}}),
        "data: [DONE]",
    ]
    text = "\n\n".join(chunks) + "\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_run_chat_streams_scores_and_measures_ttft() -> None:
    items = [
        ev.ChatItem(prompt="what is 2 + 2?", expected="4"),
        ev.ChatItem(prompt="what is 3 + 3?", expected="It is 6", match="exact"),
        ev.ChatItem(prompt="what is 5 + 5?", expected=r"\b11\b", match="regex"),
    ]
    cfg = ev.RunnerConfig(model="m", transport=httpx.MockTransport(chat_handler), max_tokens=32)
    out = asyncio.run(ev.run_chat("http://test/v1", items, cfg, "contains"))
    assert out.scores["accuracy"] == pytest.approx(2 / 3)
    assert [r["answer"] for r in out.rows] == ["It is 4", "It is 6", "It is 10"]
    assert [r["correct"] for r in out.rows] == [True, True, False]
    assert len(out.ttfts_ms) == 3 and len(out.latencies_ms) == 3
    assert all(0 < r["ttft_ms"] <= r["latency_ms"] for r in out.rows)


# --- stage function (no endpoint needed) ---------------------------------------------------


def test_stage_without_dataset_is_skipped_with_a_warning(tmp_path: Path) -> None:
    from gantry.settings import Settings
    from gantry.spec import parse_spec
    from gantry.stages.evaluate import gate_endpoint

    spec = parse_spec({"name": "minilm", "source": {"repo_id": "a/b"}})
    settings = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    result = gate_endpoint(spec, "http://127.0.0.1:1", settings)
    assert result.skipped and result.passed and result.score is None
    assert result.warning is not None and "evaluate.dataset" in result.warning


def test_stage_refuses_a_metric_of_the_other_protocol(tmp_path: Path) -> None:
    from gantry.errors import ConfigError
    from gantry.settings import Settings
    from gantry.spec import parse_spec
    from gantry.stages.evaluate import gate_endpoint

    spec = parse_spec(
        {
            "name": "minilm",
            "source": {"repo_id": "a/b"},
            "evaluate": {"dataset": str(DEMO_SET), "metric": "exact"},
        }
    )
    settings = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="one of top1, mrr"):
        gate_endpoint(spec, "http://127.0.0.1:1", settings)
