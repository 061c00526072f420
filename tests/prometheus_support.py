"""A real Prometheus for tests, a scrape target to feed it, and the recorder of the contract
data under tests/data/prometheus.

    .venv/bin/python -m tests.prometheus_support   # re-record tests/data/prometheus/*.json

The recorder starts the embedded Prometheus (``prometheus_service``) in a temporary state
dir, serves a small metrics page as a file-SD target the way the exporter will write them,
waits for it to be scraped, and stores the bodies Prometheus answers, verbatim, with the
request and status of each in ``index.json``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gantry.settings import Settings
from tests.support import free_port

DATA = Path(__file__).resolve().parent / "data" / "prometheus"

#: The labels the test target carries, as a deployment's target group will.
TARGET_LABELS = {"model": "minilm", "slot": "canary", "version": "7", "component": "server"}


@dataclass
class MetricsTarget:
    """A metrics page served in this process (prometheus_client) on 127.0.0.1."""

    port: int
    path: str
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def metrics_target() -> Iterator[MetricsTarget]:
    """Serve a counter with a value and a histogram with no observations (so a quantile
    over it is NaN, as it is for a model server that had no requests)."""
    registry = CollectorRegistry()
    requests = Counter("gantry_test_requests", "Requests served.", ["code"], registry=registry)
    requests.labels(code="200").inc(42)
    latency = Histogram(
        "gantry_test_latency_seconds", "Request latency.", buckets=(0.1, 1.0), registry=registry
    )
    Gauge("gantry_test_up", "Always 1.", registry=registry).set(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        # prometheus_client answers on every path; a non-default one proves
        # __metrics_path__ from the target group is used.
        yield MetricsTarget(port, "/custom/metrics", registry, requests, latency)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_target_group(
    targets_dir: Path, name: str, target: MetricsTarget, labels: dict[str, str]
) -> Path:
    """A file-SD target group, as the exporter writes one per deployment."""
    path = targets_dir / f"{name}.json"
    group = [{"targets": [target.address], "labels": {"__metrics_path__": target.path, **labels}}]
    tmp = path.with_suffix(".tmp")  # not *.json: Prometheus must not read it half-written
    tmp.write_text(json.dumps(group))
    tmp.replace(path)
    return path


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s:g}s")


def settings_for(state_dir: Path) -> Settings:
    return Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(state_dir),
            "GANTRY_PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}",
            # Nothing listens there: the exporter job's target is down, with an error.
            "GANTRY_EXPORTER_ADDR": f"127.0.0.1:{free_port()}",
        }
    )


# --- the recorder -------------------------------------------------------------------------

_NAN_QUERY = "histogram_quantile(0.95, sum by (le) (rate(gantry_test_latency_seconds_bucket[10s])))"

#: name -> (method, path, parameters): what each recorded file answers.
REQUESTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "query_vector": ("POST", "/api/v1/query", {"query": "gantry_test_requests_total"}),
    "query_scalar": ("POST", "/api/v1/query", {"query": "scalar(count(up))"}),
    "query_nan": ("POST", "/api/v1/query", {"query": _NAN_QUERY}),
    "query_inf": ("POST", "/api/v1/query", {"query": "1 / 0"}),
    "query_empty": ("POST", "/api/v1/query", {"query": "gantry_test_no_such_metric"}),
    "query_matrix": ("POST", "/api/v1/query", {"query": "gantry_test_up[5s]"}),
    "error_bad_data": ("POST", "/api/v1/query", {"query": "sum(rate(x[1m]"}),
    "query_range": ("POST", "/api/v1/query_range", {"query": "gantry_test_up"}),
    "targets": ("GET", "/api/v1/targets", {"state": "active"}),
}


def record(out: Path = DATA) -> None:
    from gantry.localenv.services import prometheus_service

    with tempfile.TemporaryDirectory() as tmp, metrics_target() as target:
        settings = settings_for(Path(tmp))
        prom = prometheus_service(settings)
        prom.start()
        try:
            write_target_group(settings.scrape_targets_dir, "minilm", target, TARGET_LABELS)
            url = settings.prometheus_url

            def scraped_twice() -> bool:
                r = httpx.post(
                    f"{url}/api/v1/query",
                    data={"query": "count_over_time(gantry_test_up[10s])"},
                    timeout=5,
                )
                result = r.json()["data"]["result"]
                return bool(result) and float(result[0]["value"][1]) >= 3

            wait_for(scraped_twice, 30, "the test target was not scraped 3 times")
            out.mkdir(parents=True, exist_ok=True)
            index: dict[str, object] = {}
            now = time.time()
            for name, (method, path, params) in REQUESTS.items():
                params = dict(params)
                if name == "query_range":
                    params |= {"start": f"{now - 4:.3f}", "end": f"{now:.3f}", "step": "1"}
                if method == "POST":
                    r = httpx.post(url + path, data=params, timeout=10)
                else:
                    r = httpx.get(url + path, params=params, timeout=10)
                # Temporary paths and ports say nothing about the contract: fixed names.
                body = r.text.replace(str(settings.state_dir), "/state")
                (out / f"{name}.json").write_text(body if body.endswith("\n") else body + "\n")
                index[name] = {
                    "method": method,
                    "path": path,
                    "params": params,
                    "status": r.status_code,
                }
            version = httpx.get(f"{url}/api/v1/status/buildinfo", timeout=5).json()["data"]
            (out / "index.json").write_text(
                json.dumps({"prometheus": version["version"], "responses": index}, indent=2) + "\n"
            )
        finally:
            prom.stop()


if __name__ == "__main__":
    record()
    print(f"recorded {len(REQUESTS)} responses under {DATA}")
