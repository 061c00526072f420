"""Where the canary's analysis reads a window's traffic from (``canary.metrics``).

* ``prometheus`` (default): named PromQL queries, candidate vs champion, over the
  window so far, against the embedded Prometheus (or ``GANTRY_PROMETHEUS_URL``). The
  traffic checks read job ``gantry-exporter`` (the routers' access logs, turned into
  series by :mod:`gantry.metrics`), which no model server can write; the chat TTFT check
  reads the servers' own histograms. The quality probes' scores go to the exporter and
  are read back by query, so every figure the verdict rests on is a query a person can
  run again in Prometheus.
* ``router-log``: the router's access log, read directly (no Prometheus needed).

A query with no data is no data: the check stays open, and a window that ends without
it is inconclusive, never a pass.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from string import Template
from typing import Protocol

from gantry.adapters.haproxy import Slot
from gantry.adapters.prometheus import PrometheusClient
from gantry.deploy.router import Target
from gantry.errors import MetricsUnavailableError, PrometheusUnavailableError
from gantry.metrics.client import ExporterClient, QualityPush
from gantry.stages.canary.analysis import Quality, SlotWindow, WindowCounter

log = logging.getLogger("gantry.canary")

_EXPORTER = 'job="gantry-exporter",deployment="$deployment",slot="$slot"'
_TRAFFIC = _EXPORTER + ',probe!="quality"'

#: The checks' PromQL, by name. ``$deployment`` and ``$slot`` name the server, ``$window``
#: is the time since the window's traffic observation began (e.g. ``17s``), ``$window_id``
#: names one analysis window (its quality scores).
QUERIES: dict[str, str] = {
    "requests": f"sum(increase(gantry_router_requests_total{{{_TRAFFIC}}}[$window]))",
    # Counted, not extrapolated: the first and last samples in the range (a counter the
    # exporter seeds at 0 does not reset within a window). `increase()` scales the
    # difference up to the range's edges, by half again or more while the range is a few
    # scrapes long: synthetic probes paced on it stopped short, and the window's final
    # (settled, longer-range) figure fell below canary.min_requests.
    "requests-counted": (
        f"sum(max_over_time(gantry_router_requests_total{{{_TRAFFIC}}}[$window])"
        f" - min_over_time(gantry_router_requests_total{{{_TRAFFIC}}}[$window]))"
    ),
    "failures": (
        f'sum(increase(gantry_router_requests_total{{{_TRAFFIC},outcome="failure"}}[$window]))'
    ),
    "latency-samples": (
        f"sum(increase(gantry_router_request_duration_seconds_count{{{_TRAFFIC}}}[$window]))"
    ),
    "latency-p95": (
        "histogram_quantile(0.95, sum by (le) (increase("
        f"gantry_router_request_duration_seconds_bucket{{{_TRAFFIC}}}[$window])))"
    ),
    "latency-p99": (
        "histogram_quantile(0.99, sum by (le) (increase("
        f"gantry_router_request_duration_seconds_bucket{{{_TRAFFIC}}}[$window])))"
    ),
    "ttft-samples": (
        'sum(increase(gantry_runtime_ttft_seconds_count{job="gantry-deployments",'
        'deployment="$deployment",slot="$slot"}[$window]))'
    ),
    "ttft-p95": (
        "histogram_quantile(0.95, sum by (le) (increase(gantry_runtime_ttft_seconds_bucket{"
        'job="gantry-deployments",deployment="$deployment",slot="$slot"}[$window])))'
    ),
    "followed": (
        'max(timestamp(gantry_exporter_router_followed{job="gantry-exporter",'
        'deployment="$deployment"}))'
    ),
    "seeded": f"count(gantry_router_requests_total{{{_EXPORTER}}})",
    "quality": f'max(gantry_canary_quality_score{{{_EXPORTER},window="$window_id"}})',
    "quality-items": f'max(gantry_canary_quality_items{{{_EXPORTER},window="$window_id"}})',
    "memory-p50": (
        "max(quantile_over_time(0.5, "
        f"gantry_container_memory_working_set_bytes{{{_EXPORTER}}}[$window]))"
    ),
    "memory-p99": (
        "max(quantile_over_time(0.99, "
        f"gantry_container_memory_working_set_bytes{{{_EXPORTER}}}[$window]))"
    ),
    "cpu-p50": (
        "max(quantile_over_time(0.5, "
        f"rate(gantry_container_cpu_seconds_total{{{_EXPORTER}}}[3s])[$window:1s]))"
    ),
    "cpu-p99": (
        "max(quantile_over_time(0.99, "
        f"rate(gantry_container_cpu_seconds_total{{{_EXPORTER}}}[3s])[$window:1s]))"
    ),
}


def _label_value(value: str) -> str:
    """A PromQL string literal's inside (backslash and double quote escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def render(name: str, *, deployment: str, slot: Slot, window_s: float, window_id: str = "") -> str:
    """The query ``name`` for one server and window (pure).

    >>> render("requests", deployment="gantry-m", slot=Slot.B, window_s=12.3)[:44]
    'sum(increase(gantry_router_requests_total{j'
    """
    return Template(QUERIES[name]).substitute(
        deployment=_label_value(deployment),
        slot=slot.value,
        window=f"{max(2, math.ceil(window_s))}s",
        window_id=_label_value(window_id),
    )


@dataclass(frozen=True)
class Reading:
    """What a source saw of the window so far."""

    candidate: SlotWindow
    champion: SlotWindow
    quality: Quality | None = None
    quality_missing: str | None = None
    ttft: tuple[SlotWindow, SlotWindow] | None = None
    traffic_missing: str | None = None
    #: The candidate's requests counted so far, never over-estimated (None: as
    #: ``candidate.requests``); what synthetic probes are paced on.
    candidate_counted: int | None = None
    #: check name -> the queries it read, the candidate's first (its check's own figure
    #: first among them), then the champion's
    queries: dict[str, tuple[str, ...]] = field(default_factory=dict)


class MetricSource(Protocol):
    """A window's data, one implementation per ``canary.metrics`` value."""

    name: str

    def begin(self, window: str, quality: Quality | None, cand: Slot, champ: Slot) -> None:
        """The traffic observation starts now; ``quality`` is what the probes just scored."""

    def settle(self, end_wall: float) -> None:
        """Before the final read: wait until data up to ``end_wall`` (epoch s) is in."""

    def read(self) -> Reading:
        """The window so far."""
        ...

    def usage(self) -> dict[str, float]:
        """The candidate's CPU/memory p50/p99 over the window so far ({} if unknown)."""
        ...


class RouterLogSource:
    """``canary.metrics: router-log``: the router's access log, read directly."""

    name = "router-log"

    def __init__(self, target: Target) -> None:
        self.target = target
        self._acc: dict[str, WindowCounter] = {}
        self._quality: Quality | None = None
        self._slots: tuple[Slot, Slot] = (Slot.B, Slot.A)

    def begin(self, window: str, quality: Quality | None, cand: Slot, champ: Slot) -> None:
        self.target.observe()  # what came before belongs to no traffic check
        self._acc = {cand.value: WindowCounter(), champ.value: WindowCounter()}
        self._quality, self._slots = quality, (cand, champ)

    def settle(self, end_wall: float) -> None:
        return None

    def read(self) -> Reading:
        for rec in self.target.observe():
            if rec.probe == "quality":
                continue  # eval-set batches: judged by the quality check, not latency
            if rec.server in self._acc:
                self._acc[rec.server].add(rec)
            elif rec.failed:
                log.warning("the router could not serve a request (%s)", rec.termination)
        cand, champ = self._slots
        return Reading(
            candidate=self._acc[cand.value].window(),
            champion=self._acc[champ.value].window(),
            quality=self._quality,
        )

    def usage(self) -> dict[str, float]:
        return {}


class PrometheusSource:
    """``canary.metrics: prometheus``: the checks as PromQL (see :data:`QUERIES`)."""

    name = "prometheus"

    def __init__(
        self,
        prometheus: PrometheusClient,
        exporter: ExporterClient,
        *,
        deployment: str,
        model: str,
        release_id: str,
        versions: dict[Slot, str],
        chat: bool,
        scrape_interval_s: float = 1.0,
    ) -> None:
        self.prom, self.exporter = prometheus, exporter
        self.deployment, self.model, self.release_id = deployment, model, release_id
        self.versions, self.chat = versions, chat
        self.scrape_interval_s = scrape_interval_s
        self._t_obs = time.time()
        self._window_id = ""
        self._quality: Quality | None = None
        self._slots: tuple[Slot, Slot] = (Slot.B, Slot.A)

    def _q(self, name: str, slot: Slot) -> tuple[str, float | None]:
        # The range reaches two scrapes back before the observation began: `increase()`
        # counts from the first sample in its range, so the requests between the start and
        # the first scrape after it would be lost (19 of 20 probes, seen in the bench).
        promql = render(
            name,
            deployment=self.deployment,
            slot=slot,
            window_s=time.time() - self._t_obs + 2 * self.scrape_interval_s,
            window_id=self._window_id,
        )
        value = self.prom.query(promql).scalar()
        return promql, None if value is None or math.isnan(value) else value

    def begin(self, window: str, quality: Quality | None, cand: Slot, champ: Slot) -> None:
        # A window id of its own: a re-run of the release must never read the scores an
        # earlier run pushed for the "same" step.
        self._window_id = f"{self.release_id}/{window}/{secrets.token_hex(4)}"
        self._quality, self._slots = quality, (cand, champ)
        if quality is not None:
            for slot, score in ((cand, quality.candidate), (champ, quality.champion)):
                if score is None:
                    continue  # the champion could not be scored: its query stays empty
                self.exporter.push_quality(
                    QualityPush(
                        deployment=self.deployment,
                        model=self.model,
                        slot=slot.value,
                        version=self.versions.get(slot, "unknown"),
                        metric=quality.metric,
                        window=self._window_id,
                        score=max(0.0, min(1.0, score)),
                        items=quality.items,
                    )
                )
        self._t_obs = time.time()

    def wait_ready(self, slots: tuple[Slot, ...], timeout_s: float) -> None:
        """Until Prometheus has the exporter following this deployment's router and series
        of every slot in ``slots``; MetricsUnavailableError (transient) after
        ``timeout_s``: judging a window without them would judge no data."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = []
            if (
                self.prom.query(
                    render("followed", deployment=self.deployment, slot=Slot.A, window_s=0)
                ).scalar()
                is None
            ):
                missing.append("the router's access log is not followed")
            for slot in slots:
                q = render("seeded", deployment=self.deployment, slot=slot, window_s=0)
                if not self.prom.query(q).scalar():
                    missing.append(f"no series of slot {slot.value}")
            if not missing:
                return
            if time.monotonic() > deadline:
                raise MetricsUnavailableError(
                    f"Prometheus at {self.prom.base} has no data for {self.deployment} after "
                    f"{timeout_s:.0f}s: {'; '.join(missing)}",
                    fix="check `gantry env status` (exporter and prometheus healthy) and the "
                    "Targets page of Prometheus; or set canary.metrics: router-log",
                )
            time.sleep(0.5)

    def settle(self, end_wall: float) -> None:
        """Until Prometheus has scraped the exporter after ``end_wall`` (at most three
        scrape intervals): the last requests of the window count too."""
        promql = render("followed", deployment=self.deployment, slot=Slot.A, window_s=0)
        deadline = time.monotonic() + 3 * self.scrape_interval_s + 1
        while time.monotonic() < deadline:
            last = self.prom.query(promql).scalar()
            if last is not None and last >= end_wall:
                return
            time.sleep(0.2)
        log.warning("Prometheus has not scraped the exporter since the window ended")

    def read(self) -> Reading:
        cand, champ = self._slots
        queries: dict[str, list[str]] = {}

        def q(check: str, name: str, slot: Slot) -> float | None:
            promql, value = self._q(name, slot)
            queries.setdefault(check, []).append(promql)
            return value

        windows, missing_traffic = [], []
        for slot in (cand, champ):
            # Each check's own figure first: the candidate's is then queries[0].
            failures = q("success-rate", "failures", slot)
            requests = q("success-rate", "requests", slot)
            if requests is None:
                missing_traffic.append(slot.value)
            p95 = q("latency-p95", "latency-p95", slot)
            samples = q("latency-p95", "latency-samples", slot)
            p99 = q("latency-p99", "latency-p99", slot)
            windows.append(
                SlotWindow(
                    requests=round(requests or 0),
                    failures=round(failures or 0),
                    samples=round(samples or 0),
                    p95_ms=None if p95 is None else p95 * 1000,
                    p99_ms=None if p99 is None else p99 * 1000,
                )
            )
        counted = self._q("requests-counted", cand)[1]
        ttft = None
        if self.chat:
            ttfts, exported = [], False
            for slot in (cand, champ):
                p95 = q("ttft-p95", "ttft-p95", slot)
                n = q("ttft-p95", "ttft-samples", slot)
                exported = exported or n is not None
                ttfts.append(
                    SlotWindow(samples=round(n or 0), p95_ms=None if p95 is None else p95 * 1000)
                )
            # Neither server exports gantry_runtime_ttft_seconds (a runtime with metrics of
            # its own, e.g. vLLM's): no TTFT check, rather than one that can never pass.
            ttft = (ttfts[0], ttfts[1]) if exported else None
        quality, missing = None, None
        if self._quality is not None:
            c_score = q("quality", "quality", cand)
            b_score = q("quality", "quality", champ)
            if c_score is None:
                missing = (
                    "the candidate's quality score is not in Prometheus yet (the exporter "
                    "took it; a scrape has not)"
                )
            else:
                quality = Quality(
                    metric=self._quality.metric,
                    items=self._quality.items,
                    candidate=c_score,
                    champion=b_score,
                )
        return Reading(
            candidate=windows[0],
            champion=windows[1],
            quality=quality,
            quality_missing=missing,
            ttft=ttft,
            candidate_counted=None if counted is None else int(counted),
            traffic_missing=f"Prometheus has no request series of slot(s) "
            f"{', '.join(missing_traffic)} (exporter or scrape missing)"
            if missing_traffic
            else None,
            queries={k: tuple(v) for k, v in queries.items()},
        )

    def usage(self) -> dict[str, float]:
        cand = self._slots[0]
        out: dict[str, float] = {}
        try:
            for name, key, scale in (
                ("cpu-p50", "cpu_p50_cores", 1.0),
                ("cpu-p99", "cpu_p99_cores", 1.0),
                ("memory-p50", "memory_p50_mb", 1 / 2**20),
                ("memory-p99", "memory_p99_mb", 1 / 2**20),
            ):
                _, value = self._q(name, cand)
                if value is not None:
                    out[key] = round(value * scale, 3)
        except PrometheusUnavailableError as exc:
            log.warning("the candidate's usage could not be read: %s", exc)
        return out
