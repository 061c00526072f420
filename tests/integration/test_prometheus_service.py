"""The embedded Prometheus (Debian's 2.42) as a managed service: started idempotently,
reloaded when its configuration changes, scraping a file-SD target within seconds, and
queried through the adapter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gantry.adapters.prometheus import PrometheusClient
from gantry.errors import ConfigError
from gantry.localenv.services import PrometheusProcess, metrics_services, prometheus_service
from gantry.settings import Settings
from tests.prometheus_support import (
    TARGET_LABELS,
    MetricsTarget,
    metrics_target,
    settings_for,
    wait_for,
    write_target_group,
)
from tests.support import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def prom_settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path / "state")


@pytest.fixture
def prometheus(prom_settings: Settings) -> Iterator[PrometheusProcess]:
    svc = prometheus_service(prom_settings)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def target() -> Iterator[MetricsTarget]:
    with metrics_target() as t:
        yield t


def _loaded_config(url: str) -> str:
    r = httpx.get(f"{url}/api/v1/status/config", timeout=5)
    r.raise_for_status()
    return str(r.json()["data"]["yaml"])


def test_start_is_idempotent_and_writes_its_config(
    prometheus: PrometheusProcess, prom_settings: Settings
) -> None:
    first = prometheus.start()
    assert first.healthy and first.pid is not None
    assert first.url == prom_settings.prometheus_url
    again = prometheus_service(prom_settings).start()
    assert again.pid == first.pid

    config = (prom_settings.prometheus_dir / "prometheus.yml").read_text()
    assert str(prom_settings.scrape_targets_dir / "*.json") in config
    assert prom_settings.exporter_addr in config
    assert prom_settings.scrape_targets_dir.stat().st_mode & 0o777 == 0o755
    assert (prom_settings.prometheus_dir / "data").is_dir()
    loaded = _loaded_config(first.url)
    # Both jobs scrape every second: the canary decides from these scrapes.
    assert loaded.count("scrape_interval: 1s") == 2 and loaded.count("scrape_timeout: 1s") == 2

    with PrometheusClient(first.url) as prom:
        assert prom.ready()
        # The scrape manager takes up discovered targets a moment after readiness.
        wait_for(
            lambda: any(t.scrape_pool == "gantry-exporter" for t in prom.targets()),
            10,
            "the exporter's static target was not listed",
        )


def test_changed_config_reloads_the_running_instance(
    prometheus: PrometheusProcess, prom_settings: Settings
) -> None:
    first = prometheus.start()
    assert prom_settings.exporter_addr in _loaded_config(first.url)

    moved = Settings.from_env(
        {
            "GANTRY_STATE_DIR": str(prom_settings.state_dir),
            "GANTRY_PROMETHEUS_ADDR": prom_settings.prometheus_addr,
            "GANTRY_EXPORTER_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    again = prometheus_service(moved).start()
    assert again.pid == first.pid, "a changed config is reloaded, not restarted"
    loaded = _loaded_config(first.url)
    assert moved.exporter_addr in loaded and prom_settings.exporter_addr not in loaded


def test_scrapes_a_file_sd_target_and_queries_its_labels(
    prometheus: PrometheusProcess, prom_settings: Settings, target: MetricsTarget
) -> None:
    status = prometheus.start()
    write_target_group(prom_settings.scrape_targets_dir, "minilm", target, TARGET_LABELS)
    begun = time.monotonic()
    with PrometheusClient(status.url) as prom:

        def scraped() -> bool:
            return bool(prom.query("gantry_test_requests_total").samples)

        # File SD notices the file at once (inotify) and the job scrapes every second.
        wait_for(scraped, 10, "the file-SD target was not scraped")
        took = time.monotonic() - begun
        result = prom.query('gantry_test_requests_total{code="200"}')
        (sample,) = result.samples
        assert sample.value == 42.0
        assert {k: sample.labels[k] for k in TARGET_LABELS} == TARGET_LABELS
        assert sample.labels["job"] == "gantry-deployments"
        assert sample.labels["instance"] == target.address

        (scraped_target,) = [t for t in prom.targets() if t.scrape_pool == "gantry-deployments"]
        assert scraped_target.health == "up"
        assert scraped_target.scrape_url == f"http://{target.address}{target.path}"

        # A histogram with no observations: its quantile is NaN, not an error.
        rates = "sum by (le) (rate(gantry_test_latency_seconds_bucket[5s]))"
        wait_for(lambda: bool(prom.query(rates).samples), 5, "no rate over two scrapes")
        p95 = prom.query(f"histogram_quantile(0.95, {rates})")
        value = p95.scalar()
        assert value is not None and value != value  # NaN
    assert took < 10


def test_metrics_services_follow_the_external_url(tmp_path: Path) -> None:
    local = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    assert [s.name for s in metrics_services(local)] == ["exporter", "prometheus"]
    external = Settings.from_env(
        {"GANTRY_STATE_DIR": str(tmp_path), "GANTRY_PROMETHEUS_URL": "http://prom.internal:9090/"}
    )
    assert [s.name for s in metrics_services(external)] == ["exporter"]
    assert external.prometheus_url == "http://prom.internal:9090"
    exporter = metrics_services(external)[0]
    assert exporter.argv[1:] == [
        "-m", "gantry.metrics", "serve",
        "--host", "127.0.0.1", "--port", "5078",
        "--targets-dir", str(tmp_path / "prometheus" / "targets"),
        "--deployments-dir", str(tmp_path / "deployments"),
    ]  # fmt: skip
    assert exporter.health_path == "/healthz"
    with pytest.raises(ConfigError, match="GANTRY_PROMETHEUS_URL is not an http"):
        Settings.from_env({"GANTRY_PROMETHEUS_URL": "prom.internal:9090"})


def test_a_model_server_cannot_pose_as_the_router(
    prometheus: PrometheusProcess, prom_settings: Settings, target: MetricsTarget
) -> None:
    """A candidate's /metrics naming the exporter's series (a thousand successful
    requests, say) reaches no canary query and no dashboard: those names are dropped from
    the deployments job, and the checks read job gantry-exporter only."""
    from prometheus_client import Counter

    from gantry.adapters.haproxy import Slot
    from gantry.stages.canary.sources import render

    fake = Counter(
        "gantry_router_requests",
        "Posing as the exporter.",
        ["deployment", "slot", "probe", "outcome", "job"],
        registry=target.registry,
    )
    fake.labels("gantry-m", "b", "", "success", "gantry-exporter").inc(1000)
    status = prometheus.start()
    labels = {**TARGET_LABELS, "deployment": "gantry-m", "slot": "b"}
    write_target_group(prom_settings.scrape_targets_dir, "gantry-m", target, labels)
    with PrometheusClient(status.url) as prom:
        wait_for(
            lambda: bool(prom.query("gantry_test_requests_total").samples),
            10,
            "the model server's target was not scraped",
        )
        time.sleep(1.5)  # a few more scrapes of the fake series
        assert not prom.query("gantry_router_requests_total").samples
        q = render("requests", deployment="gantry-m", slot=Slot.B, window_s=30)
        assert prom.query(q).scalar() is None


def test_requests_counted_never_exceeds_what_was_served(
    prometheus: PrometheusProcess, prom_settings: Settings, target: MetricsTarget
) -> None:
    """The canary paces its synthetic probes on ``requests-counted``: it must never say
    more requests were served than were (``increase()`` extrapolates to the range's edges,
    and probes paced on it stopped short of canary.min_requests). Once scraped, it is
    the exact count."""
    import re

    from gantry.stages.canary.sources import QUERIES

    def shaped(name: str, window_s: float) -> str:
        """The canary's query ``name`` over this target's counter instead of the router's."""
        q = re.sub(
            r"gantry_router_requests_total\{[^}]*\}",
            'gantry_test_requests_total{code="200"}',
            QUERIES[name],
        )
        return q.replace("$window", f"{max(2, int(window_s) + 1)}s")

    status = prometheus.start()
    write_target_group(prom_settings.scrape_targets_dir, "minilm", target, TARGET_LABELS)
    counter = target.requests.labels(code="200")
    with PrometheusClient(status.url) as prom:
        wait_for(
            lambda: bool(prom.query("gantry_test_requests_total").samples),
            10,
            "the file-SD target was not scraped",
        )
        time.sleep(2.5)  # flat samples before the window, as before a canary step
        # The range reaches two scrapes before the window, as the canary's does.
        t_obs, served = time.monotonic() - 2, 0
        for _ in range(12):
            counter.inc()
            served += 1
            counted = prom.query(shaped("requests-counted", time.monotonic() - t_obs)).scalar()
            assert counted is not None and counted <= served, (counted, served)
            time.sleep(0.3)
        time.sleep(2.2)  # two scrapes after the last request: the settled figure
        window = time.monotonic() - t_obs
        assert prom.query(shaped("requests-counted", window)).scalar() == served
        extrapolated = prom.query(shaped("requests", window)).scalar()
        assert extrapolated is not None and extrapolated >= served
