"""The exporter process: discovery, router log followers, container stats, HTTP.

    python -m gantry.metrics serve --host 127.0.0.1 --port 5078 \\
        --targets-dir .gantry/prometheus/targets --deployments-dir .gantry/deployments

Every ``interval_s`` it lists the containers Gantry's deploy target labelled
(``ai.gantry.deployment``), follows the log of each router it has not followed yet,
rewrites the scrape targets of each deployment (only when they change) and samples the
containers' CPU and memory. Series of versions no longer deployed are dropped after
``STALE_S`` so a long-lived exporter does not grow with every release.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker.errors
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import ValidationError

from gantry.adapters.docker_engine import DockerClient, connect
from gantry.adapters.haproxy import AccessRecord, parse_access_line
from gantry.atomicfile import write_atomic
from gantry.metrics.client import QualityPush

log = logging.getLogger("gantry.metrics")

#: Labels Gantry's deploy target puts on its containers (gantry.deploy.docker).
DEPLOYMENT_LABEL = "ai.gantry.deployment"
MODEL_LABEL = "ai.gantry.model"
ROLE_LABEL = "ai.gantry.role"
SLOT_LABEL = "ai.gantry.slot"
VERSION_LABEL = "ai.gantry.version"
RELEASE_LABEL = "ai.gantry.release"
#: The router's HAProxy Prometheus exporter listens here inside its container.
ROUTER_METRICS_PORT = 8405
#: Probe kinds as the router logs them: live traffic (""), Gantry's synthetic requests,
#: and its quality probes (eval-set batches, left out of latency checks).
PROBES = ("", "synthetic", "quality")
#: Request duration buckets (seconds): a 10 ms embedding and a 30 s chat answer alike.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0,
)  # fmt: skip
STALE_S = 900.0
#: Quality scores kept (one per slot and analysis window).
QUALITY_KEEP = 200
#: How long a log stream may stay silent before it is reopened (the API call's timeout).
FOLLOW_TIMEOUT_S = 30.0

SlotKey = tuple[str, str]  # (deployment, slot)


@dataclass
class SlotInfo:
    """A model server as discovered."""

    deployment: str
    model: str
    slot: str
    version: str
    release_id: str
    container: str
    host_port: int | None
    running: bool


@dataclass
class RouterInfo:
    deployment: str
    model: str
    container_id: str
    container: str
    metrics_port: int | None
    running: bool


@dataclass
class _Hist:
    buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0
    count: int = 0
    touched: float = field(default_factory=time.monotonic)

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(DURATION_BUCKETS, seconds)
        if i < len(self.buckets):
            self.buckets[i] += 1
        self.total += seconds
        self.count += 1
        self.touched = time.monotonic()

    def cumulative(self) -> list[tuple[str, float]]:
        out, run = [], 0
        for le, n in zip(DURATION_BUCKETS, self.buckets, strict=True):
            run += n
            out.append((repr(le), float(run)))
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class _Usage:
    labels: tuple[str, ...]
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int | None
    cpu_limit_cores: float | None
    restarts: int
    up: bool


_REQ_LABELS = ("deployment", "model", "slot", "version", "probe", "outcome", "code")
_DUR_LABELS = ("deployment", "model", "slot", "version", "probe")
_CTR_LABELS = ("deployment", "model", "role", "slot", "version", "container")
_Q_LABELS = ("deployment", "model", "slot", "version", "metric", "window")


def _code(status: int) -> str:
    return f"{status // 100}xx" if status > 0 else "none"


class Store:
    """The exporter's series, shared by the followers, the stats loop and HTTP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, ...], float] = {}
        self.touched: dict[tuple[str, ...], float] = {}
        self.durations: dict[tuple[str, ...], _Hist] = {}
        self.quality: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()
        self.usage: dict[str, _Usage] = {}
        self.slots: dict[SlotKey, SlotInfo] = {}
        self.log_lines: dict[str, int] = {}

    def version_of(self, deployment: str, slot: str) -> str:
        info = self.slots.get((deployment, slot))
        return info.version if info else "unknown"

    def record(self, deployment: str, model: str, rec: AccessRecord) -> None:
        """One request the router logged."""
        slot = rec.server if rec.server in ("a", "b") else "none"
        with self._lock:
            version = self.version_of(deployment, slot)
            key = (
                deployment,
                model,
                slot,
                version,
                rec.probe,
                "failure" if rec.failed else "success",
                _code(rec.status),
            )
            self.requests[key] = self.requests.get(key, 0.0) + 1
            self.touched[key] = time.monotonic()
            self.log_lines[deployment] = self.log_lines.get(deployment, 0) + 1
            # Latency of what was answered (as the router-log source judges it): a failure
            # is counted by the success rate, its time says nothing about speed.
            if not rec.failed and rec.total_ms >= 0:
                hkey = (deployment, model, slot, version, rec.probe)
                self.durations.setdefault(hkey, _Hist()).observe(rec.total_ms / 1000)

    def seed(self, info: SlotInfo) -> None:
        """Zero series for a discovered slot, so that `increase()` counts its first
        requests (a series that appears at 1 has no earlier sample to rise from)."""
        with self._lock:
            self.slots[(info.deployment, info.slot)] = info
            for probe in PROBES:
                base = (info.deployment, info.model, info.slot, info.version, probe)
                for tail in (("success", "2xx"), ("failure", "5xx"), ("failure", "none")):
                    self.requests.setdefault((*base, *tail), 0.0)
                    self.touched[(*base, *tail)] = time.monotonic()
                self.durations.setdefault(base, _Hist()).touched = time.monotonic()

    def push_quality(self, p: QualityPush) -> None:
        with self._lock:
            key = (p.deployment, p.model, p.slot, p.version, p.metric, p.window)
            self.quality[key] = (p.score, p.items)
            self.quality.move_to_end(key)
            while len(self.quality) > QUALITY_KEEP:
                self.quality.popitem(last=False)

    def prune(self, live: set[tuple[str, str, str]]) -> None:
        """Drop series of (deployment, slot, version) no longer deployed and idle."""
        cutoff = time.monotonic() - STALE_S
        with self._lock:
            for key in [k for k in self.requests if (k[0], k[2], k[3]) not in live]:
                if self.touched.get(key, 0) < cutoff:
                    self.requests.pop(key, None)
                    self.touched.pop(key, None)
            for hkey in [k for k in self.durations if (k[0], k[2], k[3]) not in live]:
                if self.durations[hkey].touched < cutoff:
                    del self.durations[hkey]

    def snapshot(self) -> tuple[Any, ...]:
        with self._lock:
            return (
                dict(self.requests),
                {k: (list(h.cumulative()), h.total) for k, h in self.durations.items()},
                dict(self.quality),
                dict(self.usage),
                dict(self.log_lines),
            )


class _Collector(Collector):
    def __init__(self, store: Store, health: Any) -> None:
        self.store, self.health = store, health

    def collect(self) -> Iterable[Metric]:
        requests_, durations, quality, usage, lines = self.store.snapshot()
        c = CounterMetricFamily(
            "gantry_router_requests",
            "Requests the router answered (or failed), from its access log.",
            labels=_REQ_LABELS,
        )
        for key, v in requests_.items():
            c.add_metric(list(key), v)
        yield c
        h = HistogramMetricFamily(
            "gantry_router_request_duration_seconds",
            "Time a request spent in the router (HAProxy %Ta), answered requests only.",
            labels=_DUR_LABELS,
        )
        for key, (buckets, total) in durations.items():
            h.add_metric(list(key), buckets, total)
        yield h
        q = GaugeMetricFamily(
            "gantry_canary_quality_score",
            "A slot's quality probe score (the evaluate metric) in one analysis window.",
            labels=_Q_LABELS,
        )
        n = GaugeMetricFamily(
            "gantry_canary_quality_items",
            "Eval-set items behind gantry_canary_quality_score.",
            labels=_Q_LABELS,
        )
        for key, (score, items) in quality.items():
            q.add_metric(list(key), score)
            n.add_metric(list(key), items)
        yield q
        yield n
        cpu = CounterMetricFamily(
            "gantry_container_cpu_seconds",
            "CPU time the container used (Docker stats).",
            labels=_CTR_LABELS,
        )
        mem = GaugeMetricFamily(
            "gantry_container_memory_working_set_bytes",
            "Memory in use, page cache that can be reclaimed excluded (as `docker stats`).",
            labels=_CTR_LABELS,
        )
        mem_lim = GaugeMetricFamily(
            "gantry_container_memory_limit_bytes",
            "The container's memory limit.",
            labels=_CTR_LABELS,
        )
        cpu_lim = GaugeMetricFamily(
            "gantry_container_cpu_limit_cores", "The container's CPU limit.", labels=_CTR_LABELS
        )
        restarts = GaugeMetricFamily(
            "gantry_container_restarts",
            "Times the engine restarted the container (its RestartCount).",
            labels=_CTR_LABELS,
        )
        up = GaugeMetricFamily(
            "gantry_container_up", "1 while the container runs.", labels=_CTR_LABELS
        )
        for u in usage.values():
            labels = list(u.labels)
            up.add_metric(labels, 1.0 if u.up else 0.0)
            restarts.add_metric(labels, u.restarts)
            if not u.up:
                continue
            cpu.add_metric(labels, u.cpu_seconds)
            mem.add_metric(labels, u.memory_bytes)
            if u.memory_limit_bytes:
                mem_lim.add_metric(labels, u.memory_limit_bytes)
            if u.cpu_limit_cores:
                cpu_lim.add_metric(labels, u.cpu_limit_cores)
        yield from (cpu, mem, mem_lim, cpu_lim, restarts, up)
        ll = CounterMetricFamily(
            "gantry_exporter_router_log_lines",
            "Access log lines read from each deployment's router.",
            labels=("deployment",),
        )
        for dep, v in lines.items():
            ll.add_metric([dep], v)
        yield ll
        fol = GaugeMetricFamily(
            "gantry_exporter_router_followed",
            "1 while the deployment's router access log is being followed.",
            labels=("deployment",),
        )
        for dep in self.health.followed_deployments():
            fol.add_metric([dep], 1.0)
        yield fol


def _host_port(attrs: dict[str, Any], container_port: int | None = None) -> int | None:
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for name, bound in ports.items():
        if not bound or (container_port is not None and name != f"{container_port}/tcp"):
            continue
        for b in bound:
            if b.get("HostIp") in ("127.0.0.1", "0.0.0.0", "") and b.get("HostPort"):  # noqa: S104
                return int(b["HostPort"])
    return None


def discover(client: DockerClient) -> tuple[list[RouterInfo], list[SlotInfo]]:
    """Gantry's deployment containers, as routers and model servers."""
    routers, slots = [], []
    for c in client.containers.list(all=True, filters={"label": DEPLOYMENT_LABEL}):
        labels = c.labels or {}
        dep, model = labels.get(DEPLOYMENT_LABEL, ""), labels.get(MODEL_LABEL, "")
        role, running = labels.get(ROLE_LABEL), c.status == "running"
        if role == "router":
            routers.append(
                RouterInfo(
                    deployment=dep,
                    model=model,
                    container_id=c.id,
                    container=c.name,
                    metrics_port=_host_port(c.attrs, ROUTER_METRICS_PORT),
                    running=running,
                )
            )
        elif role == "server" and labels.get(SLOT_LABEL) in ("a", "b"):
            slots.append(
                SlotInfo(
                    deployment=dep,
                    model=model,
                    slot=labels[SLOT_LABEL],
                    version=labels.get(VERSION_LABEL, "unknown"),
                    release_id=labels.get(RELEASE_LABEL, ""),
                    container=c.name,
                    host_port=_host_port(c.attrs),
                    running=running,
                )
            )
    return routers, slots


def scrape_targets(routers: list[RouterInfo], slots: list[SlotInfo]) -> dict[str, list[Any]]:
    """File-service-discovery groups per deployment (pure)."""
    out: dict[str, list[Any]] = {}
    for r in routers:
        if r.running and r.metrics_port:
            out.setdefault(r.deployment, []).append(
                {
                    "targets": [f"127.0.0.1:{r.metrics_port}"],
                    "labels": {
                        "__metrics_path__": "/metrics",
                        "component": "router",
                        "deployment": r.deployment,
                        "model": r.model,
                    },
                }
            )
    for s in sorted(slots, key=lambda s: (s.deployment, s.slot)):
        if s.running and s.host_port:
            out.setdefault(s.deployment, []).append(
                {
                    "targets": [f"127.0.0.1:{s.host_port}"],
                    "labels": {
                        "__metrics_path__": "/metrics",
                        "component": "runtime",
                        "deployment": s.deployment,
                        "model": s.model,
                        "slot": s.slot,
                        "version": s.version,
                        "release_id": s.release_id,
                    },
                }
            )
    return out


class Exporter:
    """Discovery loop, followers and stats sampling around one :class:`Store`."""

    def __init__(
        self, targets_dir: Path, interval_s: float = 1.0, deployments_dir: Path | None = None
    ) -> None:
        """``deployments_dir``: only the deployments recorded there (one state dir's; the
        engine may run another's too); None: every deployment on the engine."""
        self.targets_dir, self.interval_s = targets_dir, interval_s
        self.deployments_dir = deployments_dir
        self.store = Store()
        self.started = datetime.now(UTC)
        self.last_pass: float | None = None
        self._followers: dict[str, tuple[threading.Thread, RouterInfo]] = {}
        self._stop = threading.Event()
        self._written: dict[str, str] = {}
        self._containers: dict[str, tuple[str, ...]] = {}
        self._cursors: dict[str, datetime] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self.store, self))

    def followed(self) -> int:
        return len(self.followed_deployments())

    def followed_deployments(self) -> set[str]:
        return {r.deployment for t, r in list(self._followers.values()) if t.is_alive()}

    def stop(self) -> None:
        self._stop.set()

    # --- the loop --------------------------------------------------------------------

    def run(self) -> None:
        client = connect(timeout_s=10)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.once(client)
            except Exception as exc:  # the next pass tries again; never die of one
                log.warning("discovery pass failed: %s: %s", type(exc).__name__, exc)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def once(self, client: DockerClient) -> None:
        routers, slots = discover(client)
        if self.deployments_dir is not None:
            ours = (
                {p.name for p in self.deployments_dir.iterdir() if p.is_dir()}
                if self.deployments_dir.is_dir()
                else set()
            )
            routers = [r for r in routers if r.deployment in ours]
            slots = [s for s in slots if s.deployment in ours]
        for s in slots:
            if s.running:
                self.store.seed(s)
        for r in routers:
            known = self._followers.get(r.container_id)
            if r.running and (known is None or not known[0].is_alive()):
                t = threading.Thread(
                    target=self._follow, args=(r,), name=f"follow-{r.container}", daemon=True
                )
                self._followers[r.container_id] = (t, r)
                t.start()
        live_ids = {r.container_id for r in routers}
        for cid, (t, _) in list(self._followers.items()):
            if cid not in live_ids and not t.is_alive():
                del self._followers[cid]
                self._cursors.pop(cid, None)
        self._write_targets(scrape_targets(routers, slots))
        self._wanted(routers, slots)
        self.store.prune({(s.deployment, s.slot, s.version) for s in slots if s.running})
        self.last_pass = time.monotonic()

    def _write_targets(self, groups: dict[str, list[Any]]) -> None:
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        for dep, g in groups.items():
            text = json.dumps(g, indent=1, sort_keys=True) + "\n"
            if self._written.get(dep) != text:
                write_atomic(self.targets_dir / f"{dep}.json", text, mode=0o644)
                self._written[dep] = text
                log.info("scrape targets of %s: %d", dep, len(g))
        for path in self.targets_dir.glob("*.json"):
            if path.stem not in groups:
                path.unlink(missing_ok=True)
                self._written.pop(path.stem, None)
                log.info("scrape targets of %s removed (no containers)", path.stem)

    def _wanted(self, routers: list[RouterInfo], slots: list[SlotInfo]) -> None:
        wanted: dict[str, tuple[str, ...]] = {}
        for r in routers:
            wanted[r.container] = (r.deployment, r.model, "router", "", "", r.container)
        for s in slots:
            wanted[s.container] = (s.deployment, s.model, "server", s.slot, s.version, s.container)
        self._containers = wanted

    def sample_loop(self) -> None:
        """Container CPU and memory, every ``interval_s``, all containers at once: the
        engine answers a stats read at its next once-a-second tick, so reading them one
        after another would take a second each."""
        client = connect(timeout_s=10)
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="stats") as pool:
            while not self._stop.is_set():
                t0 = time.monotonic()
                wanted = dict(self._containers)
                try:
                    results = pool.map(lambda item: self._usage(client, *item), wanted.items())
                    self.store.usage = {
                        name: u for name, u in zip(wanted, results, strict=True) if u
                    }
                except Exception as exc:  # the next pass tries again; never die of one
                    log.warning("stats pass failed: %s: %s", type(exc).__name__, exc)
                self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    @staticmethod
    def _usage(client: DockerClient, name: str, labels: tuple[str, ...]) -> _Usage | None:
        from gantry.adapters.docker_stats import read_stats

        try:
            c = client.containers.get(name)
        except (docker.errors.NotFound, docker.errors.APIError, requests.RequestException):
            return None
        host = c.attrs.get("HostConfig") or {}
        nano = host.get("NanoCpus") or 0
        running = c.status == "running"
        try:
            sample = read_stats(c, timeout_s=5) if running else None
        except Exception as exc:  # one container's stats never stop the others'
            log.debug("stats of %s: %s", name, exc)
            sample = None
        return _Usage(
            labels=labels,
            cpu_seconds=sample.cpu_seconds_total if sample else 0.0,
            memory_bytes=sample.memory_bytes if sample else 0,
            # The configured limit (0: none); the stats' own figure is the host's memory
            # for an unlimited container on cgroup v2.
            memory_limit_bytes=host.get("Memory") or None,
            cpu_limit_cores=nano / 1e9 if nano else None,
            restarts=int(c.attrs.get("RestartCount") or 0),
            up=running and sample is not None,
        )

    # --- router logs -----------------------------------------------------------------

    def _follow(self, router: RouterInfo) -> None:
        """Count every access line the router writes from now on (or from its start),
        each once: where a stream stopped is kept per router, across reopened streams and
        a follower started again."""
        last = self._cursors.get(router.container_id, self.started)
        client = connect(timeout_s=FOLLOW_TIMEOUT_S)
        log.info("following the access log of %s", router.container)
        try:
            while not self._stop.is_set():
                try:
                    stream = client.api.logs(
                        router.container_id,
                        stdout=True,
                        stderr=False,
                        stream=True,
                        follow=True,
                        timestamps=True,
                        since=int(last.timestamp()),
                    )
                    for line in _lines(stream):
                        rec = parse_access_line(line)
                        if rec is None or rec.at <= last:
                            continue
                        last = self._cursors[router.container_id] = rec.at
                        self.store.record(router.deployment, router.model, rec)
                except docker.errors.NotFound:
                    return
                except Exception as exc:
                    # A quiet router times the stream out (urllib3 raises its own errors
                    # from a streamed body): reopen it where it stopped.
                    log.debug("log stream of %s: %s; reopening", router.container, exc)
                try:
                    if client.containers.get(router.container_id).status != "running":
                        return
                except docker.errors.NotFound:
                    return
                except (docker.errors.APIError, requests.RequestException):
                    pass
                self._stop.wait(0.2)
        finally:
            client.close()
            log.info("stopped following %s", router.container)


def _lines(stream: Iterable[bytes]) -> Iterator[str]:
    buf = b""
    for chunk in stream:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")


# --- HTTP ------------------------------------------------------------------------------


def serve(exporter: Exporter, host: str, port: int, token: str) -> ThreadingHTTPServer:
    """The exporter's HTTP server (not started): /metrics, /healthz, /canary/quality."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "gantry-exporter"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._send(200, generate_latest(exporter.registry), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                age = None if exporter.last_pass is None else time.monotonic() - exporter.last_pass
                ok = age is not None and age < max(10.0, 5 * exporter.interval_s)
                body = {
                    "ok": ok,
                    "last_pass_age_s": None if age is None else round(age, 3),
                    "routers_followed": exporter.followed(),
                }
                self._send(200 if ok else 503, json.dumps(body).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            if self.path != "/canary/quality":
                self._send(404, b'{"error": "not found"}')
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                self._send(HTTPStatus.UNAUTHORIZED, b'{"error": "a valid token is required"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > 65536:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b'{"error": "too large"}')
                return
            try:
                push = QualityPush.model_validate_json(self.rfile.read(length))
            except ValidationError as exc:
                self._send(400, json.dumps({"error": str(exc)[:500]}).encode())
                return
            exporter.store.push_quality(push)
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    return httpd


def main(
    host: str,
    port: int,
    targets_dir: Path,
    interval_s: float = 1.0,
    deployments_dir: Path | None = None,
) -> None:
    """Run until SIGTERM: the discovery loop in a thread, HTTP in this one."""
    import signal

    from gantry.metrics.client import load_or_create_token, token_path

    token = load_or_create_token(token_path(targets_dir))
    exporter = Exporter(targets_dir, interval_s, deployments_dir)
    httpd = serve(exporter, host, port, token)
    for name, target in (("discovery", exporter.run), ("stats", exporter.sample_loop)):
        threading.Thread(target=target, name=name, daemon=True).start()

    def _term(*_: object) -> None:
        exporter.stop()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    log.info("gantry metrics exporter on http://%s:%d (targets in %s)", host, port, targets_dir)
    with contextlib.suppress(KeyboardInterrupt):
        httpd.serve_forever(poll_interval=0.5)
    exporter.stop()
