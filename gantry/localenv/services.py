"""The embedded services: local OCI registry, local Hub endpoint, Prefect server, and the
metrics pair (Gantry's exporter and Prometheus).

Each runs as a detached process with a pid file and a log file under
``<state dir>/services``, is health-checked before use, and is started idempotently:
``start()`` on a healthy service does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from pydantic import BaseModel, ConfigDict

from gantry.atomicfile import write_atomic
from gantry.errors import ServiceError
from gantry.proc import pid_alive, which
from gantry.settings import Settings
from gantry.tls import tls_context

log = logging.getLogger(__name__)


class ServiceStatus(BaseModel):
    """Where a service lives and whether it answers."""

    model_config = ConfigDict(frozen=True)

    name: str
    url: str
    managed: bool
    running: bool
    healthy: bool
    pid: int | None = None
    log: str | None = None


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class ManagedProcess:
    """A long-running local process owned by Gantry."""

    name: str
    argv: list[str]
    host: str
    port: int
    health_path: str
    run_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 60
    port_env_var: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            r = httpx.get(self.url + self.health_path, timeout=timeout_s, verify=tls_context())
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def status(self, *, healthy: bool | None = None) -> ServiceStatus:
        """Where it stands; ``healthy`` when the caller has just asked (one request less)."""
        pid = self.pid()
        return ServiceStatus(
            name=self.name,
            url=self.url,
            managed=True,
            running=pid is not None,
            healthy=self.healthy() if healthy is None else healthy,
            pid=pid,
            log=str(self.logfile),
        )

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> ServiceStatus:
        """Start the process unless it already answers; wait until it is healthy."""
        with _lock(self.run_dir / f"{self.name}.lock"):
            if self.healthy():
                return self.status(healthy=True)
            if (pid := self.pid()) is not None:
                # Ours but not answering (still starting, or wedged): give it a moment.
                if self._wait_healthy(pid, min(self.startup_timeout_s, 30)):
                    return self.status(healthy=True)
                self._terminate(pid)
            elif _port_busy(self.host, self.port):
                raise ServiceError(
                    f"{self.name}: port {self.host}:{self.port} is taken by another program",
                    fix=f"stop that program, or choose another port with {self.port_env_var}"
                    if self.port_env_var
                    else "stop the program that holds the port",
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self.logfile.open("ab") as log:
                proc = subprocess.Popen(
                    self.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,
                    cwd=self.run_dir,
                )
            self.pidfile.write_text(f"{proc.pid}\n")
            if not self._wait_healthy(proc.pid, self.startup_timeout_s, proc):
                self._terminate(proc.pid)
                raise ServiceError(
                    f"{self.name} did not become healthy at {self.url}{self.health_path} within "
                    f"{self.startup_timeout_s:.0f}s; last log lines:\n{self._log_tail()}",
                    fix=f"read {self.logfile}; `gantry env down` then `gantry env up` retries",
                )
            return self.status(healthy=True)

    def _wait_healthy(
        self, pid: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            if proc is None and not pid_alive(pid):
                return False
            if self.healthy(timeout_s=2):
                return True
            time.sleep(0.3)
        return False

    def _terminate(self, pid: int, grace_s: float = 10) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        # Reap it if it is our child, so it does not linger as a zombie.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self.pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        if (pid := self.pid()) is not None:
            self._terminate(pid)
        self.pidfile.unlink(missing_ok=True)


@dataclass
class PrometheusProcess(ManagedProcess):
    """A managed Prometheus that also applies a changed configuration file.

    ``start()`` of an instance that is already healthy but was started (or last reloaded)
    with other content than ``config_file`` holds now makes it reload (``POST /-/reload``):
    settings such as the exporter's address change without a restart, which would lose the
    scrapes in between. The digest of what each instance runs is kept beside its pid file.
    """

    config_file: Path = field(default_factory=Path)
    reload_timeout_s: float = 10

    @property
    def applied_file(self) -> Path:
        return self.run_dir / f"{self.name}.config.sha256"

    def _config_digest(self) -> str:
        return hashlib.sha256(self.config_file.read_bytes()).hexdigest()

    def start(self) -> ServiceStatus:
        from gantry.adapters.prometheus import PrometheusClient

        with _lock(self.run_dir / f"{self.name}.config.lock"):
            before = self.pid()
            status = super().start()
            stamp = f"{status.pid} {self._config_digest()}\n"
            if status.pid is None:
                # Something else answers on our address (the port check let it pass as
                # healthy): not ours to reconfigure.
                return status
            if status.pid != before:
                # Started just now: it read the file as it is.
                write_atomic(self.applied_file, stamp)
                return status
            with contextlib.suppress(FileNotFoundError):
                if self.applied_file.read_text() == stamp:
                    return status
            log.info("%s: configuration changed; reloading %s", self.name, self.url)
            with PrometheusClient(self.url, timeout_s=self.reload_timeout_s) as prom:
                prom.reload()
            write_atomic(self.applied_file, stamp)
            return status

    def stop(self) -> None:
        super().stop()
        self.applied_file.unlink(missing_ok=True)


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def registry_service(settings: Settings) -> ManagedProcess:
    """Debian's `docker-registry` (the CNCF distribution registry v2) on 127.0.0.1."""
    binary = which(
        "docker-registry",
        env_var="GANTRY_REGISTRY_BIN",
        install_hint="run `make system-deps` (apt-get install docker-registry)",
    )
    host, port = _split(settings.registry)
    run_dir = settings.services_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "registry.yml"
    storage = settings.state_dir / "registry"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n"
    )
    return ManagedProcess(
        name="registry",
        argv=[str(binary), "serve", str(config)],
        host=host,
        port=port,
        health_path="/v2/",
        run_dir=run_dir,
        startup_timeout_s=30,
        port_env_var="GANTRY_LOCAL_REGISTRY_ADDR",
    )


def hub_service(settings: Settings) -> ManagedProcess:
    """The local Hub-compatible endpoint serving the demo repositories."""
    host, port = _split(settings.hub_addr)
    return ManagedProcess(
        name="hub",
        argv=[
            sys.executable,
            "-m",
            "gantry.localhub",
            "serve",
            "--root",
            str(settings.hub_dir / "store"),
            "--host",
            host,
            "--port",
            str(port),
            "--request-log",
            str(settings.services_dir / "hub-requests.jsonl"),
        ],
        host=host,
        port=port,
        health_path="/_gantry/stats",
        run_dir=settings.services_dir,
        startup_timeout_s=30,
        port_env_var="GANTRY_HUB_ADDR",
    )


def prometheus_config(settings: Settings) -> str:
    """The embedded Prometheus's configuration: Gantry's exporter, and every deployment's
    model servers and router through file service discovery.

    Both jobs scrape every second: the canary judges each step from these scrapes, and a
    5 s interval would leave a 30 s analysis window with a handful of points. The target
    groups under ``scrape_targets_dir`` set ``__metrics_path__`` and their own labels
    (``model``, ``slot``, ``version``, ``component``) per target.
    """
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {
                "job_name": "gantry-exporter",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [settings.exporter_addr]}],
            },
            {
                "job_name": "gantry-deployments",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "file_sd_configs": [
                    {
                        "files": [str(settings.scrape_targets_dir / "*.json")],
                        "refresh_interval": "5s",
                    }
                ],
                # Model servers are untrusted: a candidate exposing the exporter's series
                # names could pose as the router. The checks ask for job gantry-exporter
                # anyway; dropping the names here keeps such series out of dashboards too.
                "metric_relabel_configs": [
                    {
                        "source_labels": ["__name__"],
                        "regex": "gantry_(router|canary|container|exporter)_.*",
                        "action": "drop",
                    }
                ],
            },
        ],
    }
    return "# Written by Gantry (`gantry env up`); edits are overwritten.\n" + yaml.safe_dump(
        config, sort_keys=False
    )


def prometheus_service(settings: Settings) -> PrometheusProcess:
    """Debian's `prometheus` (2.42) on 127.0.0.1, its configuration and TSDB under the state
    dir. Writes ``prometheus.yml`` (when its content changed) and the targets directory."""
    binary = which(
        "prometheus",
        env_var="GANTRY_PROMETHEUS_BIN",
        install_hint="run `make system-deps` (apt-get install prometheus)",
    )
    host, port = _split(settings.prometheus_addr)
    root = settings.prometheus_dir
    settings.scrape_targets_dir.mkdir(parents=True, exist_ok=True)
    settings.scrape_targets_dir.chmod(0o755)
    config = root / "prometheus.yml"
    rendered = prometheus_config(settings)
    try:
        current = config.read_text()
    except FileNotFoundError:
        current = None
    if current != rendered:
        write_atomic(config, rendered)
    return PrometheusProcess(
        name="prometheus",
        argv=[
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'data'}",
            "--storage.tsdb.retention.time=7d",
            f"--web.listen-address={host}:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        host=host,
        port=port,
        health_path="/-/ready",
        run_dir=settings.services_dir,
        startup_timeout_s=60,
        port_env_var="GANTRY_PROMETHEUS_ADDR",
        config_file=config,
    )


def exporter_service(settings: Settings) -> ManagedProcess:
    """Gantry's metrics exporter (``gantry.metrics``): deployment and canary state for
    Prometheus, and the file-SD target groups of every deployment."""
    host, port = _split(settings.exporter_addr)
    return ManagedProcess(
        name="exporter",
        argv=[
            sys.executable,
            "-m",
            "gantry.metrics",
            "serve",
            "--host",
            host,
            "--port",
            str(port),
            "--targets-dir",
            str(settings.scrape_targets_dir),
        ],
        host=host,
        port=port,
        health_path="/healthz",
        run_dir=settings.services_dir,
        startup_timeout_s=30,
        port_env_var="GANTRY_EXPORTER_ADDR",
    )


def metrics_services(settings: Settings) -> list[ManagedProcess]:
    """What `gantry env up` starts for metrics, in order: the exporter, and Prometheus
    unless GANTRY_PROMETHEUS_URL names one Gantry does not manage."""
    if not settings.prometheus_is_local:
        return [exporter_service(settings)]
    return [exporter_service(settings), prometheus_service(settings)]


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment for the embedded Prefect server and its clients."""
    return {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": settings.prefect_api_url,
        # Both knobs: the ephemeral server (if ever used) and our own startup wait.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # Stage logs (stdlib loggers under "gantry") go to the flow run's log in the UI.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "gantry",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


def prefect_service(settings: Settings) -> ManagedProcess:
    """A Prefect server with its SQLite database under the state dir."""
    env = prefect_env(settings)
    env.pop("PREFECT_API_URL")  # the server itself must not point at itself as a client
    return ManagedProcess(
        name="prefect",
        argv=[
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.prefect_port),
        ],
        host="127.0.0.1",
        port=settings.prefect_port,
        health_path="/api/health",
        run_dir=settings.services_dir,
        env=env,
        startup_timeout_s=180,
        port_env_var="GANTRY_PREFECT_PORT",
    )


#: The work pool prefect.yaml's deployments use; `gantry serve` runs a worker for it.
DEFAULT_WORK_POOL = "gantry-process"


def worker_name() -> str:
    """The local worker's name: stable, so restarts do not pile up workers in the pool."""
    return f"gantry-{socket.gethostname()}"


def worker_service(
    settings: Settings,
    *,
    pool: str = DEFAULT_WORK_POOL,
    limit: int = 1,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """A Prefect process worker polling ``pool``; its health endpoint is on 127.0.0.1.

    ``env`` points it at the Prefect API (see ``prefect_env``). ``limit`` caps concurrent
    flow runs: releases build images and run containers, so one at a time by default.
    """
    return ManagedProcess(
        name="worker",
        argv=[
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--name",
            worker_name(),
            "--limit",
            str(limit),
            "--with-healthcheck",
            "--install-policy",
            "never",
        ],
        host="127.0.0.1",
        port=settings.worker_port,
        health_path="/health",
        run_dir=settings.services_dir,
        env={
            **(env or {}),
            "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
            "PREFECT_WORKER_WEBSERVER_PORT": str(settings.worker_port),
        },
        startup_timeout_s=90,
        port_env_var="GANTRY_WORKER_PORT",
    )
