"""Prometheus's contract: the answers Prometheus 2.42 (Debian) really gave, recorded under
tests/data/prometheus by ``python -m tests.prometheus_support``, replayed through the
adapter; and the mapping of the errors that are hard to provoke on a real server."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from gantry.adapters.prometheus import PrometheusClient
from gantry.errors import (
    PrometheusQueryError,
    PrometheusResponseError,
    PrometheusUnavailableError,
    is_transient,
)
from tests.prometheus_support import REQUESTS, TARGET_LABELS
from tests.support import free_port

pytestmark = pytest.mark.contract

DATA = Path(__file__).resolve().parents[1] / "data" / "prometheus"
INDEX = json.loads((DATA / "index.json").read_text())["responses"]
URL = "http://prom.test:9090"


def _replay(name: str) -> PrometheusClient:
    """A client whose one answer is the recorded response ``name``; the request it sends
    must be the one that was recorded (method, path, query)."""
    meta = INDEX[name]
    body = (DATA / f"{name}.json").read_bytes()

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == meta["method"]
        assert request.url.path == meta["path"]
        sent = parse_qs(request.content.decode()) if request.method == "POST" else {}
        sent |= {k: [v] for k, v in request.url.params.items()}
        if "query" in meta["params"]:
            assert sent["query"] == [meta["params"]["query"]]
        return httpx.Response(
            meta["status"], content=body, headers={"Content-Type": "application/json"}
        )

    return PrometheusClient(URL, transport=httpx.MockTransport(handle))


def _query(name: str) -> str:
    return str(INDEX[name]["params"]["query"])


# --- every recorded answer --------------------------------------------------------------


def test_every_recording_is_indexed_and_tested() -> None:
    files = {p.stem for p in DATA.glob("*.json")} - {"index"}
    assert files == set(INDEX) == set(REQUESTS)
    assert json.loads((DATA / "index.json").read_text())["prometheus"].startswith("2.42")


def test_vector() -> None:
    with _replay("query_vector") as prom:
        result = prom.query(_query("query_vector"))
    assert result.result_type == "vector"
    (sample,) = result.samples
    assert sample.value == 42.0
    assert sample.labels["__name__"] == "gantry_test_requests_total"
    assert sample.labels["code"] == "200"
    assert {k: sample.labels[k] for k in TARGET_LABELS} == TARGET_LABELS
    assert sample.labels["job"] == "gantry-deployments"
    assert sample.at.tzinfo is not None and sample.at.year >= 2024
    assert result.scalar() == 42.0


def test_scalar() -> None:
    with _replay("query_scalar") as prom:
        result = prom.query(_query("query_scalar"))
    assert result.result_type == "scalar"
    (sample,) = result.samples
    assert sample.labels == {}
    assert sample.value == 2.0  # the exporter's target and the test's


def test_nan_from_histogram_quantile_over_no_requests() -> None:
    with _replay("query_nan") as prom:
        result = prom.query(_query("query_nan"))
    value = result.scalar()
    assert value is not None and math.isnan(value)


def test_inf() -> None:
    with _replay("query_inf") as prom:
        result = prom.query(_query("query_inf"))
    assert result.result_type == "scalar"
    assert result.samples[0].value == math.inf


def test_empty_vector() -> None:
    with _replay("query_empty") as prom:
        result = prom.query(_query("query_empty"))
    assert result.samples == ()
    assert result.scalar() is None


def test_range_vector_from_an_instant_query_is_refused() -> None:
    with _replay("query_matrix") as prom, pytest.raises(PrometheusQueryError) as info:
        prom.query(_query("query_matrix"))
    assert not is_transient(info.value)
    assert "gantry_test_up[5s]" in str(info.value)
    assert "query_range" in str(info.value) and "rate()" in str(info.value)


def test_bad_data_is_a_query_error_with_the_query_reason_and_fix() -> None:
    with _replay("error_bad_data") as prom, pytest.raises(PrometheusQueryError) as info:
        prom.query(_query("error_bad_data"))
    err = info.value
    assert not is_transient(err)
    assert err.query == "sum(rate(x[1m]"
    assert "unclosed left parenthesis" in err.reason
    assert "sum(rate(x[1m]" in str(err) and "bad_data" in str(err)
    assert "fix: correct the PromQL" in str(err)


def test_query_range() -> None:
    meta = INDEX["query_range"]["params"]
    start = datetime.fromtimestamp(float(meta["start"]), UTC)
    end = datetime.fromtimestamp(float(meta["end"]), UTC)
    with _replay("query_range") as prom:
        series = prom.query_range(_query("query_range"), start, end, step_s=1)
    (one,) = series
    assert one.labels["model"] == "minilm"
    assert len(one.points) >= 3
    assert all(v == 1.0 for _, v in one.points)
    times = [t for t, _ in one.points]
    assert times == sorted(times) and start <= times[0] and times[-1] <= end


def test_targets() -> None:
    with _replay("targets") as prom:
        targets = prom.targets()
    by_pool = {t.scrape_pool: t for t in targets}
    assert set(by_pool) == {"gantry-deployments", "gantry-exporter"}
    deployment = by_pool["gantry-deployments"]
    assert deployment.health == "up" and deployment.last_error == ""
    assert deployment.scrape_url.endswith("/custom/metrics")  # __metrics_path__ applied
    assert {k: deployment.labels[k] for k in TARGET_LABELS} == TARGET_LABELS
    assert deployment.last_scrape is not None and deployment.last_scrape.tzinfo is not None
    exporter = by_pool["gantry-exporter"]  # nothing listened at the exporter's address
    assert exporter.health == "down"
    assert "connection refused" in exporter.last_error


# --- the requests the client builds -----------------------------------------------------


def test_query_sends_time_and_its_own_deadline() -> None:
    seen: dict[str, list[str]] = {}

    def handle(request: httpx.Request) -> httpx.Response:
        seen.update(parse_qs(request.content.decode()))
        return httpx.Response(
            200, json={"status": "success", "data": {"resultType": "vector", "result": []}}
        )

    at = datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    with PrometheusClient(URL, timeout_s=2.5, transport=httpx.MockTransport(handle)) as prom:
        prom.query("up", at=at)
    assert seen == {"query": ["up"], "time": [f"{at.timestamp():.3f}"], "timeout": ["2.5s"]}


# --- error mapping ----------------------------------------------------------------------


def _answering(status: int, body: str = "", *, ctype: str = "application/json") -> PrometheusClient:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=body, headers={"Content-Type": ctype})

    return PrometheusClient(URL, transport=httpx.MockTransport(handle))


def test_503_not_ready_is_transient() -> None:
    # What /api/v1/* answers while the TSDB is still replaying its WAL.
    with _answering(503, "Service Unavailable", ctype="text/plain") as prom:
        with pytest.raises(PrometheusUnavailableError) as info:
            prom.query("up")
        assert not prom.ready()
    assert is_transient(info.value)
    assert "not ready" in str(info.value) and "'up'" in str(info.value)
    assert "gantry env up" in str(info.value) and "GANTRY_PROMETHEUS_URL" in str(info.value)


def test_query_timeout_503_keeps_prometheus_reason() -> None:
    body = json.dumps(
        {"status": "error", "errorType": "timeout", "error": "query timed out in query execution"}
    )
    with _answering(503, body) as prom, pytest.raises(PrometheusUnavailableError) as info:
        prom.query("sum(rate(x[30d]))")
    assert "query timed out" in str(info.value)


def test_500_is_transient() -> None:
    prom = _answering(500, "oops", ctype="text/plain")
    with prom, pytest.raises(PrometheusUnavailableError):
        prom.targets()


def test_422_execution_error_is_a_query_error() -> None:
    body = '{"status":"error","errorType":"execution","error":"many-to-many matching not allowed"}'
    with _answering(422, body) as prom, pytest.raises(PrometheusQueryError) as info:
        prom.query("a * on() b")
    assert not is_transient(info.value)
    assert "many-to-many" in str(info.value) and "execution" in str(info.value)


@pytest.mark.parametrize("status", [401, 403])
def test_refusal_names_the_credentials(status: int) -> None:
    prom = _answering(status, "Unauthorized", ctype="text/plain")
    with prom, pytest.raises(PrometheusResponseError) as info:
        prom.query("up")
    assert not is_transient(info.value)
    assert "GANTRY_PROMETHEUS_URL" in str(info.value)


def test_not_a_prometheus() -> None:
    prom = _answering(404, "<html>404</html>", ctype="text/html")
    with prom, pytest.raises(PrometheusResponseError, match="is it a Prometheus server"):
        prom.query("up")


def test_timeout_is_transient() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with PrometheusClient(URL, transport=httpx.MockTransport(handle)) as prom:
        with pytest.raises(PrometheusUnavailableError, match="did not answer"):
            prom.query("up")
        assert not prom.ready()


def test_connection_refused_is_transient_and_redacts_credentials() -> None:
    url = f"http://gantry:s3cret-pass@127.0.0.1:{free_port()}"
    with PrometheusClient(url, timeout_s=2) as prom:
        assert not prom.ready()
        with pytest.raises(PrometheusUnavailableError) as info:
            prom.query("up")
    assert is_transient(info.value)
    assert "s3cret" not in str(info.value) and "gantry:" not in str(info.value)


def test_credentials_go_in_a_header_not_the_url() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="Prometheus Server is Ready.\n")

    with PrometheusClient(
        "https://gantry:s3cret-pass@prom.test:9443/", transport=httpx.MockTransport(handle)
    ) as prom:
        assert prom.ready()
        assert prom.base == "https://prom.test:9443"
    (request,) = seen
    assert str(request.url) == "https://prom.test:9443/-/ready"
    assert request.headers["Authorization"].startswith("Basic ")


def test_reload_refusals() -> None:
    prom = _answering(403, "Lifecycle API is not enabled.", ctype="text/plain")
    with prom, pytest.raises(PrometheusResponseError, match="--web.enable-lifecycle"):
        prom.reload()
    bad = "failed to reload config: couldn't load configuration (--config.file=x.yml)"
    prom = _answering(500, bad, ctype="text/plain")
    with prom, pytest.raises(PrometheusResponseError, match="keeps the old one") as info:
        prom.reload()
    assert "couldn't load configuration" in str(info.value)
