"""The metrics exporter's pure parts and its HTTP face: series from access records, the
scrape targets per deployment, the quality push that only Gantry's token may make, and
the canary's PromQL as rendered for one server and window."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.metrics.client import ExporterClient, QualityPush, load_or_create_token
from gantry.metrics.exporter import Exporter, RouterInfo, SlotInfo, scrape_targets, serve
from gantry.stages.canary.sources import QUERIES, render
from tests.support import free_port

pytestmark = pytest.mark.unit

DEP, MODEL = "gantry-m-1234", "acme/model"


def _slot(slot: str = "b", version: str = "7", port: int | None = 32001) -> SlotInfo:
    return SlotInfo(DEP, MODEL, slot, version, "rel-1", f"{DEP}-{slot}", port, True)


def _rec(server: str, status: int, ms: int, probe: str = "") -> AccessRecord:
    return AccessRecord(
        at=datetime.now(UTC),
        server=server,
        status=status,
        total_ms=ms,
        response_ms=ms,
        retries=0,
        redispatched=False,
        termination="----",
        probe=probe,
    )


def _samples(exporter: Exporter) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(exporter.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    found = [float(v) for (n, lab), v in samples.items() if n == name and want <= lab]
    assert found, f"no {name} with {labels}"
    return sum(found)


def test_access_records_become_counts_and_latency_per_slot_version_and_probe(
    tmp_path: Path,
) -> None:
    ex = Exporter(tmp_path / "targets")
    ex.store.seed(_slot("b", "7"))
    ex.store.seed(_slot("a", "6"))
    for _ in range(3):
        ex.store.record(DEP, MODEL, _rec("b", 200, 40))
    ex.store.record(DEP, MODEL, _rec("b", 503, 2))
    ex.store.record(DEP, MODEL, _rec("b", 200, 900, probe="quality"))
    ex.store.record(DEP, MODEL, _rec("a", 200, 20, probe="synthetic"))
    ex.store.record(DEP, MODEL, _rec("<NOSRV>", -1, 5))
    s = _samples(ex)
    req = "gantry_router_requests_total"
    assert _value(s, req, slot="b", version="7", probe="", outcome="success") == 3
    assert _value(s, req, slot="b", version="7", outcome="failure", code="5xx") == 1
    assert _value(s, req, slot="b", probe="quality") == 1
    assert _value(s, req, slot="a", version="6", probe="synthetic") == 1
    assert _value(s, req, slot="none", code="none", outcome="failure") == 1
    # Failed requests are counted, not timed; the 40 ms ones land in the 0.05 s bucket.
    dur = "gantry_router_request_duration_seconds"
    assert _value(s, dur + "_count", slot="b", probe="") == 3
    assert _value(s, dur + "_bucket", slot="b", probe="", le="0.025") == 0
    assert _value(s, dur + "_bucket", slot="b", probe="", le="0.05") == 3
    assert _value(s, dur + "_sum", slot="b", probe="") == pytest.approx(0.12)


def test_a_discovered_slot_has_zero_series_before_its_first_request(tmp_path: Path) -> None:
    """`increase()` needs a sample before the first request to count it."""
    ex = Exporter(tmp_path / "targets")
    ex.store.seed(_slot("b", "9"))
    s = _samples(ex)
    req = "gantry_router_requests_total"
    for probe in ("", "synthetic", "quality"):
        assert _value(s, req, slot="b", version="9", probe=probe, outcome="failure") == 0
        assert _value(s, "gantry_router_request_duration_seconds_count", probe=probe) == 0


def test_scrape_targets_name_each_server_and_the_router_by_deployment() -> None:
    routers = [RouterInfo(DEP, MODEL, "cid", f"{DEP}-router", 41000, True)]
    slots = [_slot("b", "7", 32002), _slot("a", "6", 32001), _slot("a", "5", None)]
    slots[2].running = False
    groups = scrape_targets(routers, slots)
    assert list(groups) == [DEP]
    (router, a, b) = groups[DEP]
    assert router["targets"] == ["127.0.0.1:41000"]
    assert router["labels"]["component"] == "router"
    assert a["labels"].items() >= {"slot": "a", "version": "6", "component": "runtime"}.items()
    assert a["targets"] == ["127.0.0.1:32001"] and b["labels"]["release_id"] == "rel-1"
    assert all(g["labels"]["__metrics_path__"] == "/metrics" for g in groups[DEP])


def test_targets_files_are_rewritten_only_when_they_change_and_removed_with_the_deployment(
    tmp_path: Path,
) -> None:
    ex = Exporter(tmp_path / "targets")
    groups = scrape_targets([RouterInfo(DEP, MODEL, "cid", "r", 41000, True)], [_slot()])
    ex._write_targets(groups)
    path = tmp_path / "targets" / f"{DEP}.json"
    first = path.stat().st_mtime_ns
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:41000"]
    ex._write_targets(groups)
    assert path.stat().st_mtime_ns == first
    ex._write_targets({})
    assert not path.exists()


@pytest.fixture
def http_exporter(tmp_path: Path) -> Iterator[tuple[Exporter, str, str]]:
    ex = Exporter(tmp_path / "targets")
    token = load_or_create_token(tmp_path / "token")
    port = free_port()
    httpd = serve(ex, "127.0.0.1", port, token)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield ex, f"http://127.0.0.1:{port}", token
    finally:
        httpd.shutdown()
        httpd.server_close()


def _push(**over: object) -> QualityPush:
    data: dict[str, object] = {
        "deployment": DEP,
        "model": MODEL,
        "slot": "b",
        "version": "7",
        "metric": "top1",
        "window": "rel-1/1.1/abcd",
        "score": 0.42,
        "items": 20,
    }
    return QualityPush.model_validate({**data, **over})


def test_quality_scores_are_taken_only_with_the_token(
    http_exporter: tuple[Exporter, str, str],
) -> None:
    from gantry.errors import MetricsUnavailableError

    ex, url, token = http_exporter
    with pytest.raises(MetricsUnavailableError, match="401"):
        ExporterClient(url, "0" * 64).push_quality(_push())
    r = httpx.post(f"{url}/canary/quality", json={"slot": "b"})
    assert r.status_code == 401  # no token, no body parsing either
    bad = httpx.post(
        f"{url}/canary/quality",
        content=b'{"slot": "z"}',
        headers={"Authorization": f"Bearer {token}"},
    )
    assert bad.status_code == 400
    ExporterClient(url, token).push_quality(_push())
    text = httpx.get(f"{url}/metrics").text
    assert 'gantry_canary_quality_score{deployment="gantry-m-1234"' in text
    s = _samples(ex)
    assert _value(s, "gantry_canary_quality_score", window="rel-1/1.1/abcd") == 0.42
    assert _value(s, "gantry_canary_quality_items", slot="b") == 20


def test_health_needs_a_recent_discovery_pass(http_exporter: tuple[Exporter, str, str]) -> None:
    ex, url, _ = http_exporter
    assert httpx.get(f"{url}/healthz").status_code == 503  # the loop never ran
    import time

    ex.last_pass = time.monotonic()
    assert httpx.get(f"{url}/healthz").json()["ok"] is True


def test_every_query_renders_with_its_server_window_and_escaped_values() -> None:
    for name in QUERIES:
        q = render(name, deployment=DEP, slot=Slot.B, window_s=12.2, window_id='r"1\\x')
        assert "$" not in q, (name, q)
        if "job=" in q:
            assert f'deployment="{DEP}"' in q
    q = render("quality", deployment=DEP, slot=Slot.B, window_s=1, window_id='r"1\\x')
    assert 'window="r\\"1\\\\x"' in q and 'slot="b"' in q
    # A window never shorter than two scrapes; seconds rounded up.
    assert "[13s]" in render("requests", deployment=DEP, slot=Slot.A, window_s=12.2)
    assert "[2s]" in render("requests", deployment=DEP, slot=Slot.A, window_s=0.3)
    # The traffic checks read only the exporter's job: no model server can write them.
    for name in ("requests", "failures", "latency-p95", "latency-p99", "quality"):
        assert 'job="gantry-exporter"' in QUERIES[name]
    assert 'probe!="quality"' in QUERIES["latency-p95"]
