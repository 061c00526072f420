"""Deploy target `docker`: an HAProxy router and the model servers on the local engine.

Per model: a private network ``<name>``, the router ``<name>-router`` (HAProxy from
Debian's package, in the locally built ``haproxy:2.6-bookworm`` image) publishing the
model's endpoint on 127.0.0.1, and up to two servers ``<name>-a`` / ``<name>-b`` run
hardened by digest. The router finds the servers by name through Docker's DNS; weights
change through its runtime API, a unix socket in ``<deployment dir>/router-admin/``,
mounted into the router and no model server, as is its configuration directory
``<deployment dir>/router-config/`` (read-only; a directory, so a rewritten file reaches
a reload). Gantry's probes carry the deployment's probe token
(``<deployment dir>/probe-token``, 0600).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors
import requests

from gantry.adapters import containers
from gantry.adapters.docker_engine import DockerClient
from gantry.adapters.haproxy import (
    ADMIN_DIR,
    ADMIN_SOCKET,
    CONFIG_DIR,
    CONFIG_PATH,
    FRONTEND_PORT,
    METRICS_PORT,
    AccessRecord,
    RouterConfig,
    RuntimeAPI,
    ServerState,
    Slot,
    parse_access_line,
    probe_headers,
    render_config,
    slot_host,
)
from gantry.atomicfile import write_atomic
from gantry.deploy.router import Launch, RoutedState
from gantry.deploy.router import ServerState as SlotState
from gantry.errors import (
    ContainerEngineError,
    DockerUnavailableError,
    RouterError,
    RouterUnavailableError,
)

log = logging.getLogger(__name__)

ROUTER_IMAGE = "haproxy:2.6-bookworm"
DEPLOYMENT_LABEL = "ai.gantry.deployment"
ROLE_LABEL = "ai.gantry.role"
SLOT_LABEL = "ai.gantry.slot"
VERSION_LABEL = "ai.gantry.version"
MODEL_LABEL = "ai.gantry.model"
ROUTER_START_S = 30.0


def check_weights(weights: Mapping[Slot, int]) -> None:
    """Weights are percentages, and something must always take traffic."""
    for slot, w in weights.items():
        if not 0 <= w <= 100:
            raise ValueError(f"weight of slot {slot} must be 0-100, not {w}")
    if sum(weights.values()) <= 0:
        raise ValueError("at least one slot must keep a weight above 0, or every request fails")


def apply_order(current: Mapping[Slot, int], target: Mapping[Slot, int]) -> list[Slot]:
    """Slots in the order their weights should change: raises first, so that no moment
    has every weight at 0 (HAProxy would answer 503)."""
    return sorted(target, key=lambda s: target[s] <= current.get(s, 0))


def _port_free(port: int, wait_s: float = 10.0) -> bool:
    """Whether 127.0.0.1:``port`` can be bound, waiting a little: the engine's port proxy
    of a container just removed (our own old router) lets go of it asynchronously."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket() as s:
            # As a server binds: connections of clients that just left (TIME_WAIT) do not
            # hold the port.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


class DockerTarget:
    """A model's deployment on the local Docker engine (router + model servers)."""

    def __init__(
        self,
        client: DockerClient,
        *,
        model: str,
        name: str,
        config_path: Path,
        runtime_port: int,
        health_path: str,
        port: int | None,
        ensure_router_image: Callable[[], None] | None = None,
        api_timeout_s: float = 5.0,
    ) -> None:
        self.client, self.model, self.name = client, model, name
        #: The deployment's own directory: runtime API socket, probe token, load marker.
        self.deployment_dir = config_path.parent
        # The router mounts the configuration's *directory*: a bind-mounted file pins its
        # inode, and the atomic rewrite (a rename) would never reach a running router,
        # whose reload would read the old file again.
        self.config_path = config_path.parent / "router-config" / config_path.name
        self.runtime_port, self.health_path = runtime_port, health_path
        self.port = port
        self._ensure_router_image = ensure_router_image
        self._api_timeout_s = api_timeout_s
        self._weights: dict[Slot, int] = {}
        self._cursor = datetime.now(UTC)

    # --- names ---------------------------------------------------------------------------

    @property
    def router_name(self) -> str:
        return f"{self.name}-router"

    def server_name(self, slot: Slot) -> str:
        return slot_host(self.name, slot)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _labels(self, role: str, **extra: str) -> dict[str, str]:
        return {DEPLOYMENT_LABEL: self.name, MODEL_LABEL: self.model, ROLE_LABEL: role, **extra}

    def _get(self, name: str) -> Any | None:
        try:
            return self.client.containers.get(name)
        except docker.errors.NotFound:
            return None
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise DockerUnavailableError(f"cannot inspect container {name}: {exc}") from None

    # --- network and router --------------------------------------------------------------

    def ensure_network(self) -> None:
        try:
            nets = self.client.networks.list(names=[self.name])
            if not any(n.name == self.name for n in nets):
                self.client.networks.create(
                    self.name, driver="bridge", labels=self._labels("network")
                )
                log.info("created network %s", self.name)
        except docker.errors.APIError as exc:
            raise ContainerEngineError(f"creating network {self.name} failed: {exc}") from None

    def _write_config(self, weights: Mapping[Slot, int]) -> None:
        text = render_config(self._config(weights))
        # HAProxy runs as its own non-root user inside the container: world-readable. The
        # deployment's directory (0700 under the state dir) keeps other users out.
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.parent.chmod(0o755)
        write_atomic(self.config_path, text, mode=0o644)

    def _config(self, weights: Mapping[Slot, int] | None = None) -> RouterConfig:
        return RouterConfig(
            deployment=self.name,
            runtime_port=self.runtime_port,
            health_path=self.health_path,
            probe_token=self.probe_token,
            weights=dict(weights or {}),
        )

    @property
    def admin_dir(self) -> Path:
        """The host directory holding the runtime API socket (mounted into the router)."""
        return self.deployment_dir / "router-admin"

    def _ensure_admin_dir(self) -> None:
        self.admin_dir.mkdir(parents=True, exist_ok=True)
        # The router's own non-root user creates the socket there; sticky, so it cannot
        # remove what it did not create.
        self.admin_dir.chmod(0o1777)

    @functools.cached_property
    def probe_token(self) -> str:
        """The deployment's probe token, made once and kept (0600) beside its config."""
        path = self.deployment_dir / "probe-token"
        with contextlib.suppress(FileNotFoundError):
            token = path.read_text().strip()
            if len(token) == 64:
                return token
        token = secrets.token_hex(32)
        write_atomic(path, token, mode=0o600)
        return token

    def probe_headers(self, slot: Slot, kind: str) -> dict[str, str]:
        """Headers that route a probe of ``kind`` to ``slot`` (honoured from Gantry only)."""
        return probe_headers(self.probe_token, slot, kind)

    def api(self) -> RuntimeAPI:
        container = self._get(self.router_name)
        if container is None:
            raise RouterUnavailableError(
                f"router {self.router_name} does not exist",
                fix=f"`gantry rollback {self.model}` recreates it with the champion",
            )
        return RuntimeAPI(self.admin_dir / ADMIN_SOCKET, self._api_timeout_s)

    def router_running(self) -> bool:
        c = self._get(self.router_name)
        return c is not None and c.status == "running"

    def ensure(self, weights: Mapping[Slot, int]) -> None:
        """Network and router up; an existing live router keeps its state (the caller sets
        weights), a dead one is replaced by one started with ``weights``."""
        check_weights(weights)
        self.ensure_network()
        existing = self._get(self.router_name)
        if existing is not None and (
            "-W" not in (existing.attrs.get("Config", {}).get("Cmd") or [])
            or admin_socket_of(existing.attrs) != self.admin_dir / ADMIN_SOCKET
            or config_dir_of(existing.attrs) != self.config_path.parent
            or f"{METRICS_PORT}/tcp"
            not in (existing.attrs.get("HostConfig", {}).get("PortBindings") or {})
        ):
            # Not in master-worker mode (dev builds), or a router of a Gantry whose runtime API
            # listened on the network, whose configuration was a mounted file or which did
            # not publish its metrics: it cannot be reloaded into this one, so replace it.
            log.warning("router %s cannot reload its configuration; replacing it", self.router_name)
            with contextlib.suppress(docker.errors.NotFound):
                existing.remove(force=True)
            existing = None
        if existing is not None and existing.status == "running":
            self._router_port_from(existing)
            self._weights = self.current_weights()
            if self._loaded_marker.is_file() and self._loaded_marker.read_text() == self._template:
                return
            # The router runs an older configuration (a Gantry upgrade): reload it the way
            # HAProxy's master process does it without dropping connections, keeping the
            # live weights.
            log.info("router %s: configuration changed, reloading it", self.router_name)
            self._write_config(self._weights)
            try:
                existing.kill(signal="SIGUSR2")
            except docker.errors.APIError as exc:
                raise RouterError(f"reloading router {self.router_name} failed: {exc}") from None
            self.api().wait_alive(ROUTER_START_S)
            self._loaded_marker.write_text(self._template)
            return
        if existing is not None:
            log.warning(
                "router %s is %s; replacing it with champion weights",
                self.router_name,
                existing.status,
            )
            with contextlib.suppress(docker.errors.NotFound):
                existing.remove(force=True)
        if self._ensure_router_image:
            self._ensure_router_image()
        if self.port is None:
            # Docker picks a free port; it is then kept for the deployment's lifetime.
            port_binding: tuple[str, int | None] = ("127.0.0.1", None)
        elif not _port_free(self.port):
            raise RouterError(
                f"port {self.port} on 127.0.0.1 is taken, so the router of {self.model} "
                "cannot publish the model's endpoint there",
                fix="stop what listens there, or set canary.port to a free port",
            )
        else:
            port_binding = ("127.0.0.1", self.port)
        self._write_config(weights)
        self._ensure_admin_dir()
        try:
            container = self.client.containers.create(
                ROUTER_IMAGE,
                # -W: master-worker, so SIGUSR2 reloads the configuration seamlessly.
                command=["haproxy", "-W", "-db", "-f", CONFIG_PATH],
                name=self.router_name,
                user="haproxy",
                read_only=True,
                tmpfs={"/tmp": "rw,noexec,nosuid,size=16m"},  # noqa: S108 - the container's own
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                mem_limit="256m",
                nano_cpus=1_000_000_000,
                pids_limit=256,
                volumes={
                    str(self.config_path.parent): {"bind": CONFIG_DIR, "mode": "ro"},
                    str(self.admin_dir): {"bind": ADMIN_DIR, "mode": "rw"},
                },
                ports={
                    f"{FRONTEND_PORT}/tcp": port_binding,
                    # Prometheus scrapes HAProxy's own exporter here (gantry.metrics).
                    f"{METRICS_PORT}/tcp": ("127.0.0.1", None),
                },
                network=self.name,
                labels=self._labels("router"),
                # The endpoint outlives Gantry's processes and comes back with the engine.
                restart_policy={"Name": "unless-stopped"},
            )
            container.start()
        except docker.errors.ImageNotFound:
            raise RouterError(
                f"router image {ROUTER_IMAGE} is missing",
                fix="run `gantry env up` (it builds the image from Debian's haproxy package)",
            ) from None
        except docker.errors.APIError as exc:
            with contextlib.suppress(Exception):
                self.client.containers.get(self.router_name).remove(force=True)
            raise RouterError(f"starting router {self.router_name} failed: {exc}") from None

        def gone() -> str | None:
            container.reload()
            state = container.attrs.get("State") or {}
            if container.status in ("exited", "dead") or container.attrs.get("RestartCount"):
                return f"it exited with code {state.get('ExitCode')}"
            return None

        try:
            api = RuntimeAPI(self.admin_dir / ADMIN_SOCKET, self._api_timeout_s)
            api.wait_alive(ROUTER_START_S, gone)
        except RouterUnavailableError as exc:
            logs = container.logs(tail=30).decode(errors="replace")
            # A router that cannot start would restart forever: leave nothing behind.
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
            raise RouterUnavailableError(
                f"router {self.router_name} did not come up ({exc.message}); its log:\n{logs}",
                fix=f"read the log above (a config error names its line in {self.config_path})",
            ) from None
        self._router_port_from(container)
        self._weights = dict(weights)
        self._loaded_marker.write_text(self._template)
        log.info("router %s serves %s", self.router_name, self.endpoint)

    @property
    def _loaded_marker(self) -> Path:
        """Holds the template the running router was started (or reloaded) with."""
        return self.deployment_dir / (self.config_path.name + ".loaded")

    @property
    def _template(self) -> str:
        """The configuration without weights: what a running router must be reloaded for."""
        return hashlib.sha256(render_config(self._config()).encode()).hexdigest()

    def _router_port_from(self, container: Any) -> None:
        bound = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(
            f"{FRONTEND_PORT}/tcp"
        )
        if bound:
            self.port = int(bound[0]["HostPort"])

    def current_weights(self) -> dict[Slot, int]:
        weights = self.api().weights()
        return {s: weights[s.value] for s in Slot if s.value in weights}

    def set_weights(self, weights: Mapping[Slot, int]) -> None:
        check_weights(weights)
        api = self.api()
        current = self.current_weights()
        for slot in apply_order(current, weights):
            if current.get(slot) != weights[slot]:
                api.set_weight(slot, weights[slot])
        self._weights = {**current, **weights}
        self._write_config(self._weights)
        log.info(
            "router %s weights: %s",
            self.router_name,
            ", ".join(f"{s.value}={w}" for s, w in sorted(self._weights.items())),
        )

    def retire(self, slot: Slot, drain_s: float) -> None:
        api = self.api()
        weights = {**self.current_weights(), slot: 0}
        check_weights(weights)
        api.set_weight(slot, 0)
        api.set_state(slot, ServerState.DRAIN)
        deadline = time.monotonic() + drain_s
        while (stat := api.stats().get(slot.value)) and stat.current_sessions > 0:
            if time.monotonic() > deadline:
                log.warning(
                    "slot %s still has %d connection(s) after %.0fs of draining; taking it out",
                    slot.value,
                    stat.current_sessions,
                    drain_s,
                )
                break
            time.sleep(0.1)
        api.set_state(slot, ServerState.MAINT)
        self._weights = weights
        self._write_config(weights)

    def readmit(self, slot: Slot) -> None:
        self.api().set_state(slot, ServerState.READY)

    def routed(self, slot: Slot) -> RoutedState | None:
        stat = self.api().stats().get(slot.value)
        if stat is None:
            return None
        parked = stat.status.startswith(("NOLB", "MAINT", "DRAIN"))
        return RoutedState(up=stat.up, parked=parked, detail=stat.status)

    def wait_server_up(self, slot: Slot, deadline_s: float) -> None:
        """Until the router's health check sees ``slot`` UP (it resolves and answers)."""
        end = time.monotonic() + deadline_s
        api = self.api()
        while True:
            stat = api.stats().get(slot.value)
            if stat is not None and stat.up:
                return
            if time.monotonic() > end:
                raise RouterError(
                    f"the router does not see slot {slot.value} ({self.server_name(slot)}) "
                    f"as up after {deadline_s:.0f}s (status {stat.status if stat else '?'})",
                    fix="check the container answers its health path on the deployment "
                    "network (`docker logs` of the router and the server)",
                )
            time.sleep(0.2)

    def observe(self) -> list[AccessRecord]:
        container = self._get(self.router_name)
        if container is None:
            raise RouterUnavailableError(f"router {self.router_name} disappeared")
        try:
            raw = container.logs(
                stdout=True, stderr=False, timestamps=True, since=int(self._cursor.timestamp())
            )
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise RouterUnavailableError(f"cannot read the router's log: {exc}") from None
        out: list[AccessRecord] = []
        for line in bytes(raw).decode("utf-8", errors="replace").splitlines():
            rec = parse_access_line(line)
            if rec is not None and rec.at > self._cursor:
                out.append(rec)
        if out:
            self._cursor = max(r.at for r in out)
        return out

    def skip_log(self) -> None:
        """Start :meth:`observe` from now (what came before belongs to no window)."""
        self._cursor = datetime.now(UTC)

    # --- model servers -------------------------------------------------------------------

    def start(self, slot: Slot, launch: Launch) -> float:
        name = self.server_name(slot)
        if (old := self._get(name)) is not None:
            log.info("removing %s (%s) to reuse slot %s", name, old.status, slot.value)
            with contextlib.suppress(docker.errors.NotFound):
                old.remove(force=True, v=True)
        labels = {**launch.labels, **self._labels("server", **{SLOT_LABEL: slot.value})}
        running = containers.run_hardened(
            self.client,
            launch.image,
            weights_dir=launch.weights_dir,
            mount_point=launch.mount_point,
            port=launch.port,
            env=launch.env,
            args=launch.args,
            cpus=launch.cpus,
            memory_mb=launch.memory_mb,
            gpus=launch.gpus,
            labels=labels,
            network=self.name,
            name=name,
        )
        try:
            cold, _ = containers.wait_healthy(running, launch.health_path, launch.deadline_s)
        except BaseException:
            running.remove()
            raise
        return cold

    def state(self, slot: Slot) -> SlotState:
        c = self._get(self.server_name(slot))
        if c is None:
            return SlotState(False, "missing")
        st = c.attrs.get("State") or {}
        if c.status == "running":
            return SlotState(
                True,
                "running",
                restarts=int(c.attrs.get("RestartCount") or 0),
                started_at=str(st.get("StartedAt") or ""),
            )
        oom = " (killed for exceeding its memory limit)" if st.get("OOMKilled") else ""
        return SlotState(False, f"{c.status}, exit code {st.get('ExitCode')}{oom}")

    def logs(self, slot: Slot, tail: int = 40) -> str:
        c = self._get(self.server_name(slot))
        if c is None:
            return ""
        try:
            return bytes(c.logs(tail=tail)).decode("utf-8", errors="replace")
        except (docker.errors.APIError, requests.RequestException):
            return ""

    def remove(self, slot: Slot) -> None:
        c = self._get(self.server_name(slot))
        if c is not None:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
            log.info("removed %s", self.server_name(slot))

    def remove_all(self) -> int:
        """Every container and the network of this deployment; how many containers."""
        n = 0
        for c in self.client.containers.list(
            all=True, filters={"label": f"{DEPLOYMENT_LABEL}={self.name}"}
        ):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
                n += 1
        for net in self.client.networks.list(names=[self.name]):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                net.remove()
        return n


@dataclass(frozen=True)
class RunningVersion:
    """A model server of a deployment, as its container's labels describe it."""

    version: str
    release_id: str
    image: str
    slot: Slot


def config_dir_of(router_attrs: Mapping[str, Any]) -> Path | None:
    """The host directory a router container reads its configuration from (None: none)."""
    for m in router_attrs.get("Mounts") or []:
        if m.get("Destination") == CONFIG_DIR and m.get("Source"):
            return Path(m["Source"])
    return None


def admin_socket_of(router_attrs: Mapping[str, Any]) -> Path | None:
    """The host path of a router container's runtime API socket (None: not mounted)."""
    for m in router_attrs.get("Mounts") or []:
        if m.get("Destination") == ADMIN_DIR and m.get("Source"):
            return Path(m["Source"]) / ADMIN_SOCKET
    return None


def discover(client: DockerClient, name: str) -> tuple[list[RunningVersion], int | None]:
    """The servers of deployment ``name`` (from their labels and images) and the port its
    router publishes: what `gantry rollback` rebuilds a damaged status from."""
    servers, port = [], None
    for c in client.containers.list(all=True, filters={"label": f"{DEPLOYMENT_LABEL}={name}"}):
        labels = c.labels or {}
        if labels.get(ROLE_LABEL) == "router":
            # The port Docker bound (it may have picked it), else the one asked for.
            for where in (
                c.attrs.get("NetworkSettings", {}).get("Ports"),
                c.attrs.get("HostConfig", {}).get("PortBindings"),
            ):
                bound = (where or {}).get(f"{FRONTEND_PORT}/tcp") or [{}]
                if bound[0].get("HostPort"):
                    port = int(bound[0]["HostPort"])
                    break
        elif labels.get(ROLE_LABEL) == "server":
            servers.append(
                RunningVersion(
                    version=labels[VERSION_LABEL],
                    release_id=labels[containers.RELEASE_LABEL],
                    image=str(c.attrs["Config"]["Image"]),
                    slot=Slot(labels[SLOT_LABEL]),
                )
            )
    return servers, port


def remove_deployments(client: DockerClient, deployments_dir: Path) -> int:
    """Stop every deployment recorded under ``deployments_dir`` (`gantry env down`); their
    status is kept, so the next release or `gantry rollback` starts the champion again."""
    names = (
        [p.name for p in deployments_dir.iterdir() if p.is_dir()]
        if deployments_dir.is_dir()
        else []
    )
    removed = 0
    for name in names:
        for c in client.containers.list(all=True, filters={"label": f"{DEPLOYMENT_LABEL}={name}"}):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
                removed += 1
        for net in client.networks.list(names=[name]):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                net.remove()
    return removed
