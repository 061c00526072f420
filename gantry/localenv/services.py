"""The embedded services: local OCI registry, local Hub endpoint, Prefect server, the
metrics pair (Gantry's exporter and Prometheus), and, for GANTRY_TOPOLOGY=multi, the
tracking pair (PostgreSQL and an MLflow tracking server on it).

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
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from pydantic import BaseModel, ConfigDict

from gantry.atomicfile import write_atomic
from gantry.errors import GantryError, ServiceError, ToolNotFoundError
from gantry.proc import pid_alive, process_start, redact_text, run, which
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
    #: Values never shown: removed from the log lines a startup failure quotes.
    secrets: Sequence[str] = ()

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
            pid_text, _, started = self.pidfile.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        # Another process under a recorded pid (after a reboot, or in a restarted
        # container's new pid namespace) is not ours to wait for or stop.
        if started and process_start(pid) not in (None, started):
            return None
        return pid

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
            tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
        return redact_text(tail, self.secrets)

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
            self.pidfile.write_text(f"{proc.pid} {process_start(proc.pid) or ''}".strip() + "\n")
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
            # Only this state dir's deployments: the engine may run another's too.
            "--deployments-dir",
            str(settings.deployments_dir),
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
            settings.prefect_host,
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


# --- the tracking pair (GANTRY_TOPOLOGY=multi) ---------------------------------------------

#: The embedded cluster's superuser (MLflow connects as it) and MLflow's database.
POSTGRES_USER = "gantry"
MLFLOW_DATABASE = "mlflow"
#: The system user Debian's postgresql package creates: PostgreSQL refuses to run as root.
POSTGRES_SYSTEM_USER = "postgres"
_POSTGRES_HINT = "run `make system-deps` (apt-get install postgresql)"
# A Unix socket path longer than this (sun_path, less the NUL) cannot be bound.
_SOCKET_PATH_MAX = 107


def postgres_bin(tool: str) -> Path:
    """A PostgreSQL server binary (``initdb``, ``postgres``, ``pg_isready``).

    Debian keeps them off PATH, under /usr/lib/postgresql/<major>/bin: looked for in
    ``$GANTRY_POSTGRES_BIN_DIR``, then ``pg_config --bindir``, then the newest major under
    /usr/lib/postgresql, then PATH.
    """
    if override := os.environ.get("GANTRY_POSTGRES_BIN_DIR"):
        path = Path(override) / tool
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ToolNotFoundError(
            tool,
            env_var=None,
            install_hint=f"GANTRY_POSTGRES_BIN_DIR={override} holds no executable {tool}; "
            "fix the variable or unset it",
        )
    dirs: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(GantryError):
            dirs.append(Path(run([pg_config, "--bindir"], timeout_s=10).stdout.strip()))

    def major(p: Path) -> int:
        return int(p.parent.name) if p.parent.name.isdigit() else -1

    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    for d in dirs:
        path = d / tool
        if path.is_file() and os.access(path, os.X_OK):
            return path
    if found := shutil.which(tool):
        return Path(found)
    raise ToolNotFoundError(tool, env_var="GANTRY_POSTGRES_BIN_DIR", install_hint=_POSTGRES_HINT)


def _run_as() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when Gantry runs as root (None: as Gantry itself)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise ServiceError(
            f"PostgreSQL refuses to run as root, and there is no `{POSTGRES_SYSTEM_USER}` "
            "system user to run it as",
            fix=f"{_POSTGRES_HINT}: Debian's package creates the user; or run Gantry as "
            "another user",
        ) from None


def _as_user(argv: list[str], account: pwd.struct_passwd | None) -> list[str]:
    """``argv`` run as ``account``: setpriv switches user and group, then execs, so the pid
    Gantry records is PostgreSQL's own (runuser and su stay as a parent that kills their
    child two seconds after any signal, mid-shutdown)."""
    if account is None:
        return argv
    setpriv = which(
        "setpriv", env_var=None, install_hint="apt-get install util-linux (it ships setpriv)"
    )
    return [
        str(setpriv),
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--init-groups",
        "--",
        *argv,
    ]


def postgres_password_file(settings: Settings) -> Path:
    """The cluster superuser's password, in libpq's passfile format (PGPASSFILE), 0600."""
    return settings.postgres_dir / "pgpass"


def postgres_password(settings: Settings, *, create: bool = False) -> str | None:
    """The generated password of the embedded cluster (made once with ``create``)."""
    return _password(postgres_password_file(settings), create=create)


def _password(path: Path, *, create: bool) -> str | None:
    try:
        line = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return None
        password = secrets.token_hex(24)  # hex: nothing to escape in a passfile line
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:*:*:{POSTGRES_USER}:{password}\n")
        return password
    return line.rsplit(":", 1)[1]


@dataclass
class PostgresProcess(ManagedProcess):
    """A PostgreSQL cluster under the state dir, owned by Gantry.

    ``start()`` creates the cluster once (``initdb``: only where the data dir has no
    PG_VERSION; scram-sha-256 with a generated password in ``pgpass``), starts the server
    and creates ``database``. Healthy means the port accepts a connection and ``pg_isready``
    says the server accepts sessions. ``stop()`` asks for a fast shutdown (SIGINT: sessions
    are ended, a checkpoint is written) before the usual SIGTERM/SIGKILL.
    """

    data_dir: Path = field(default_factory=Path)
    socket_dir: Path = field(default_factory=Path)
    password_file: Path = field(default_factory=Path)
    database: str = MLFLOW_DATABASE
    user: str = POSTGRES_USER
    account: pwd.struct_passwd | None = None
    initdb: Path = field(default_factory=Path)
    pg_isready: Path = field(default_factory=Path)
    shutdown_timeout_s: float = 60
    #: The state dir: Gantry makes it 0700 (`gantry` does on every command), so it lets
    #: the server's user through it (o+x, no listing) rather than refuse.
    state_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def healthy(self, timeout_s: float = 2.0) -> bool:
        if not _port_busy(self.host, self.port):
            return False
        done = run(
            [
                self.pg_isready,
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-t",
                str(max(1, round(timeout_s))),
            ],
            timeout_s=timeout_s + 5,
            check=False,
        )
        return done.returncode == 0

    def _owned(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)
        path.chmod(mode)

    def _check_reachable(self) -> None:
        """As another user, every directory above the data dir must let it through."""
        if self.account is None:
            return
        for parent in self.data_dir.parents:
            try:
                st = parent.stat()
            except FileNotFoundError:
                continue  # made below with the default mode (umask 022: traversable)
            ours = self.state_dir is not None and (
                parent == self.state_dir or self.state_dir in parent.parents
            )
            if ours and st.st_uid == os.getuid() and not st.st_mode & 0o001:
                # Search only: the server's user can reach its cluster by name, and still
                # cannot list the records, keys and tokens beside it.
                parent.chmod((st.st_mode & 0o777) | 0o001)
                continue
            if st.st_uid != self.account.pw_uid and not st.st_mode & 0o001:
                raise ServiceError(
                    f"postgres: the `{self.account.pw_name}` user PostgreSQL runs as cannot "
                    f"enter {parent} (mode {st.st_mode & 0o777:o})",
                    fix=f"chmod o+x {parent}, or set GANTRY_STATE_DIR to a directory every "
                    "user can traverse",
                )

    def _initdb(self, password: str) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._check_reachable()
        self._owned(self.data_dir.parent, 0o755)
        self._owned(self.data_dir, 0o700)
        # initdb reads the password from a file the cluster's user can open; gone after.
        pwfile = self.data_dir.parent / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        try:
            log.info("%s: creating the cluster in %s", self.name, self.data_dir)
            run(
                _as_user(
                    [
                        str(self.initdb),
                        "--pgdata",
                        str(self.data_dir),
                        "--username",
                        self.user,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                        "--no-locale",
                    ],
                    self.account,
                ),
                timeout_s=120,
                fix=f"read the error above; remove {self.data_dir} to start over (its data "
                "is lost)",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _ensure_database(self, password: str) -> None:
        import psycopg2  # imported late: only the multi topology needs it

        try:
            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                password=password,
                dbname="postgres",
                connect_timeout=10,
            )
        except psycopg2.Error as exc:
            raise ServiceError(
                f"{self.name}: cannot connect to {self.url}: "
                f"{redact_text(str(exc).strip(), [password])}",
                fix=f"read {self.logfile}; the password is in {self.password_file}",
            ) from None
        try:
            conn.autocommit = True  # CREATE DATABASE runs outside a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    log.info("%s: creating database %s", self.name, self.database)
                    cur.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
        finally:
            conn.close()

    def start(self) -> ServiceStatus:
        with _lock(self.run_dir / f"{self.name}.cluster.lock"):
            password = _password(self.password_file, create=True)
            assert password is not None
            self.secrets = (*self.secrets, password)
            if len(str(self.socket_dir / f".s.PGSQL.{self.port}.lock")) > _SOCKET_PATH_MAX:
                raise ServiceError(
                    f"{self.name}: the socket path under {self.socket_dir} is longer than "
                    f"{_SOCKET_PATH_MAX} bytes, which Unix sockets do not allow",
                    fix="set GANTRY_STATE_DIR to a shorter path",
                )
            self._initdb(password)
            self._owned(self.socket_dir, 0o755)
            status = super().start()
            self._ensure_database(password)
            return status

    def _terminate(self, pid: int, grace_s: float = 10) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # fast shutdown; SIGTERM would wait for sessions
        deadline = time.monotonic() + self.shutdown_timeout_s
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        super()._terminate(pid, grace_s)


def postgres_service(settings: Settings) -> PostgresProcess:
    """Debian's PostgreSQL (15 on bookworm) with its cluster under the state dir, listening
    on 127.0.0.1 only; run as the `postgres` system user when Gantry runs as root.

    Usage: ``postgres_service(settings).start()`` (creates the cluster and the ``mlflow``
    database the first time; a no-op on a healthy server).
    """
    host, port = _split(settings.postgres_addr)
    root = settings.postgres_dir
    data_dir = root / "data"
    socket_dir = root / "run"
    account = _run_as()
    binary = postgres_bin("postgres")
    password_file = postgres_password_file(settings)
    return PostgresProcess(
        name="postgres",
        argv=_as_user(
            [
                str(binary),
                "-D",
                str(data_dir),
                "-h",
                host,
                "-p",
                str(port),
                "-k",
                str(socket_dir),
            ],
            account,
        ),
        host=host,
        port=port,
        health_path="",
        run_dir=settings.services_dir,
        startup_timeout_s=60,
        port_env_var="GANTRY_POSTGRES_ADDR",
        secrets=tuple(filter(None, [_password(password_file, create=False)])),
        data_dir=data_dir,
        socket_dir=socket_dir,
        password_file=password_file,
        account=account,
        initdb=postgres_bin("initdb"),
        pg_isready=postgres_bin("pg_isready"),
        state_dir=settings.state_dir,
    )


#: Workers of the embedded MLflow server. Its handlers are short and run in a thread pool;
#: one process leaves the second core of a 2-core host to the release itself.
MLFLOW_SERVER_WORKERS = 1


def mlflow_server_service(settings: Settings) -> ManagedProcess:
    """An MLflow tracking server on the embedded PostgreSQL, serving artifacts itself
    (``--serve-artifacts``: clients upload and download through it, so every host reads
    the same files) from ``mlflow_artifacts_dir``.

    The backend URI carries no password: libpq reads it from ``PGPASSFILE``, so it is in
    no argv, environment or log.
    """
    host, port = _split(settings.mlflow_server_addr)
    pg_host, pg_port = _split(settings.postgres_addr)
    # The driver named: SQLAlchemy 2.1 takes a bare postgresql:// to mean psycopg 3.
    backend = f"postgresql+psycopg2://{POSTGRES_USER}@{pg_host}:{pg_port}/{MLFLOW_DATABASE}"
    return ManagedProcess(
        name="mlflow",
        argv=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--serve-artifacts",
            "--artifacts-destination",
            str(settings.mlflow_artifacts_dir),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(MLFLOW_SERVER_WORKERS),
        ],
        host=host,
        port=port,
        health_path="/health",
        run_dir=settings.services_dir,
        env={"PGPASSFILE": str(postgres_password_file(settings))},
        # The first start creates MLflow's schema (alembic migrations): tens of seconds.
        startup_timeout_s=180,
        port_env_var="GANTRY_MLFLOW_ADDR",
        secrets=tuple(filter(None, [postgres_password(settings)])),
    )


def tracking_services(settings: Settings) -> list[ManagedProcess]:
    """What `gantry env up` starts for the tracking store, in order: nothing for the single
    topology (SQLite under the state dir); PostgreSQL, then the MLflow server on it, for
    GANTRY_TOPOLOGY=multi. `gantry env down` stops them in the reverse order."""
    if settings.topology != "multi":
        return []
    return [postgres_service(settings), mlflow_server_service(settings)]
