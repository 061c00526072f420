"""`gantry topology up --workers N`: several Gantry hosts as containers on one machine.

A private Docker network carries a control host (Prefect server, PostgreSQL + MLflow
tracking server, registry, Hub endpoint, the CI webhook receiver) and N worker hosts
(a Prefect process worker polling one work pool, its own state dir, its own Prometheus and
exporter), each with its own address, so a test can kill one (``docker kill``) or cut it
off the network. All are one image: the topology's base image (Debian packages by
debootstrap, :data:`~gantry.localenv.baseimages.TOPOLOGY_HOST_BASE`) with Gantry installed
from the project's wheelhouse (``dockerfiles/topology``).

This engine cannot run engines inside containers, so worker hosts build images and start
model containers through the machine's Docker socket. What those containers publish lives
on the engine host's loopback; :mod:`gantry.localenv.loopback` brings it to the workers
(and only to them). Paths a worker hands to the engine (the weights it mounts into a
candidate, the deployments' router configuration) are host paths mounted at the same path
in the worker, so the engine finds them.

Ports on the engine host's 127.0.0.1, from ``--port-base`` (default 5170): +0 Prefect
(API and UI), +1 registry, +2 Hub, +3 MLflow, +4 webhook; +5 is the relay, on the
network's gateway address only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from pydantic import BaseModel, ConfigDict, Field

from gantry.atomicfile import link_or_copy, write_atomic
from gantry.errors import ConfigError, DockerUnavailableError, ServiceError
from gantry.localenv.loopback import PortRange
from gantry.proc import redact_text
from gantry.settings import Settings

log = logging.getLogger("gantry.topology")

IMAGE_REPO = "gantry/topology-host"
#: Every container and the network carry it, valued with the topology's name.
LABEL = "ai.gantry.topology"
ROLE_LABEL = "ai.gantry.topology.role"
#: In-container ports of the control host's services (published on the host's loopback).
CONTROL_PORTS = {"prefect": 4200, "registry": 5075, "hub": 5076, "mlflow": 5080, "webhook": 4280}
#: Where a worker's forwarder listens for the connections iptables redirects to it.
FORWARD_PORT = 15001
#: The name workers know the control host by.
CONTROL_HOST = "control"
#: Seconds between a flow run's heartbeats; a run silent for three is marked crashed.
HEARTBEAT_S = 30
WORK_POOL = "gantry-process"


class TopologyPorts(BaseModel):
    """The topology's ports on the engine host (the relay's on the gateway address)."""

    model_config = ConfigDict(frozen=True)

    prefect: int
    registry: int
    hub: int
    mlflow: int
    webhook: int
    relay: int

    @classmethod
    def from_base(cls, base: int) -> TopologyPorts:
        if not 1024 <= base <= 65530:
            raise ConfigError(
                f"--port-base {base}: the topology needs six ports from it",
                fix="choose a base between 1024 and 65530, below the engine's port range",
            )
        names = ("prefect", "registry", "hub", "mlflow", "webhook", "relay")
        return cls(**{n: base + i for i, n in enumerate(names)})


class Topology(BaseModel):
    """One topology: what `up` made, kept in ``<root>/topology.json`` for `down` and
    `status`."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    root: Path = Field(description="Host directory of the topology's state.")
    project_dir: Path = Field(description="The checkout the hosts run flows from.")
    spec_dir: Path | None = Field(
        default=None, description="Where webhook deliveries' spec files live (None: the checkout)."
    )
    workers: int = Field(ge=1, le=16)
    ports: TopologyPorts
    image: str = ""

    @property
    def spec_root(self) -> Path:
        return self.spec_dir or self.project_dir

    @property
    def network(self) -> str:
        return self.name

    def container(self, role: str) -> str:
        return f"{self.name}-{role}"

    def worker_roles(self) -> list[str]:
        return [f"worker-{i}" for i in range(1, self.workers + 1)]

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def token_file(self) -> Path:
        return self.secrets_dir / "relay.token"

    @property
    def webhook_secret_file(self) -> Path:
        return self.secrets_dir / "webhook.secret"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def deployments_dir(self) -> Path:
        return self.root / "deployments"

    @property
    def webhook_config(self) -> Path:
        return self.root / "webhook.yaml"

    def state_dir(self, role: str) -> Path:
        return self.root / "hosts" / role

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prefect}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.webhook}/webhook"


def hub_store(t: Topology) -> Path:
    """The control host's hub store (a host path: `up` publishes the demo model into it)."""
    return Settings.from_env({"GANTRY_STATE_DIR": str(t.state_dir("control"))}).hub_dir / "store"


def topology_root(settings: Settings) -> Path:
    return settings.state_dir / "topology"


def load_topology(root: Path) -> Topology | None:
    """The topology `up` saved under ``root``; None when there is none."""
    path = root / "topology.json"
    try:
        return Topology.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(
            f"{path} is not a topology this Gantry can read: {str(exc)[:300]}",
            fix=f"`gantry topology down` with the Gantry that made it, or delete {path}",
        ) from None


def save_topology(t: Topology) -> None:
    t.root.mkdir(parents=True, exist_ok=True)
    write_atomic(t.root / "topology.json", t.model_dump_json(indent=2))


# --- the image ----------------------------------------------------------------------------


def marker_env(python_full_version: str, machine: str) -> dict[str, str]:
    """PEP 508 marker values of the image's interpreter (Debian's CPython on Linux)."""
    return {
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2]),
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": machine,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def image_lock(export: str, env: Mapping[str, str]) -> str:
    """``uv export``'s requirements (every platform's pins, with markers) reduced to the
    pins whose marker holds in ``env``, markers dropped: what pip installs in the image."""
    from packaging.markers import Marker

    out: list[str] = []
    joined = export.replace("\\\n", " ")
    for line in joined.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        req, _, hashes = text.partition(" --hash")
        pin, sep, marker = req.partition(";")
        if sep and not Marker(marker.strip()).evaluate(dict(env)):
            continue
        out.append(f"{pin.strip()} --hash{hashes}" if hashes else pin.strip())
    return "\n".join(out) + "\n"


def _source_files(project_dir: Path) -> list[Path]:
    """What the Gantry wheel is built from (the image's tag digests them)."""
    files = [project_dir / "pyproject.toml"]
    for pkg in ("gantry", "flows", "tasks"):
        files += sorted(
            p
            for p in (project_dir / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
        )
    return files


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def source_digest(project_dir: Path) -> str:
    """sha256 over the files the Gantry wheel is built from (their paths and bytes)."""
    return _digest(
        *(
            str(f.relative_to(project_dir)).encode() + b"\0" + f.read_bytes()
            for f in _source_files(project_dir)
        )
    )


def _build_wheel(project_dir: Path, out: Path) -> Path:
    """The Gantry wheel, built from a copy of its sources (the checkout stays clean)."""
    from gantry.proc import run

    src = out / "src"
    for f in _source_files(project_dir):
        dest = src / f.relative_to(project_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    # pyproject names it as the package's long description; its text changes nothing the
    # hosts run, so it is not part of the image's tag either.
    (src / "README.md").write_text("Gantry, as installed on the hosts of `gantry topology`.\n")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        timeout_s=600,
        fix="check that PyPI (or PIP_INDEX_URL) is reachable: pip fetches setuptools to build",
    )
    (wheel,) = out.glob("gantry-*.whl")
    return wheel


def _build(
    client: docker.DockerClient,
    dockerfile: Path,
    tag: str,
    lay_out: Callable[[Path], None],
    *,
    buildargs: Mapping[str, str] | None = None,
) -> None:
    from gantry.adapters import docker_engine

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gantry-topology-") as tmp:
        ctx = Path(tmp) / "context"
        ctx.mkdir()
        lay_out(ctx)
        shutil.copy2(dockerfile, ctx / "Dockerfile")
        log.info("topology image %s: building", tag)
        docker_engine.build(
            client,
            ctx,
            tag=tag,
            target=None,
            labels={LABEL: "image"},
            timeout_s=1800,
            buildargs=buildargs,
        )
    log.info("topology image %s: built in %.0fs", tag, time.monotonic() - t0)


def ensure_image(client: docker.DockerClient, settings: Settings, project_dir: Path) -> str:
    """The topology's host image for this checkout, built when missing; returns its tag.

    Two layers of images: the dependencies (tagged by the base recipe, the lock and
    deps.Dockerfile: rebuilt only when those change, minutes) and Gantry's own wheel on top
    (tagged by its sources as well: seconds).
    """
    from gantry.adapters import docker_engine
    from gantry.localenv.baseimages import LABEL_RECIPE, TOPOLOGY_HOST_BASE, ensure_base_image
    from gantry.wheelhouse import Wheelhouse

    here = project_dir / "dockerfiles" / "topology"
    base = ensure_base_image(
        TOPOLOGY_HOST_BASE, docker_client=client, work_dir=settings.base_images_dir, log=log
    )
    config = client.images.get(base.image_id).attrs["Config"]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    machine = platform.machine()
    lock = image_lock(
        (here / "requirements.txt").read_text(),
        marker_env(env.get("PYTHON_VERSION", "3.11"), machine),
    )
    recipe = (config.get("Labels") or {}).get(LABEL_RECIPE, "")
    deps_tag = (
        "gantry/topology-deps:"
        + _digest(recipe.encode(), lock.encode(), (here / "deps.Dockerfile").read_bytes())[:16]
    )
    if not docker_engine.image_exists(client, deps_tag):
        arch = {"arm64": "aarch64"}.get(machine, machine)

        def deps_context(ctx: Path) -> None:
            (ctx / "requirements.txt").write_text(lock)
            wheels = Wheelhouse(settings.wheelhouse_dir, settings.built_wheels_dir).ensure(
                ctx / "requirements.txt", python_version="3.11", arch=arch
            )
            (ctx / "wheelhouse").mkdir()
            for w in wheels:
                link_or_copy(w, ctx / "wheelhouse" / w.name)

        _build(client, here / "deps.Dockerfile", deps_tag, deps_context)
    tag = (
        f"{IMAGE_REPO}:"
        + _digest(
            deps_tag.encode(),
            (here / "host.Dockerfile").read_bytes(),
            source_digest(project_dir).encode(),
        )[:16]
    )
    if docker_engine.image_exists(client, tag):
        log.info("topology image %s: present", tag)
        return tag

    def host_context(ctx: Path) -> None:
        _build_wheel(project_dir, ctx / "wheel")
        for w in (ctx / "wheel").glob("gantry-*.whl"):
            os.replace(w, ctx / w.name)
        shutil.rmtree(ctx / "wheel")

    _build(client, here / "host.Dockerfile", tag, host_context, buildargs={"DEPS_IMAGE": deps_tag})
    return tag


# --- the containers -----------------------------------------------------------------------


def engine_port_range() -> PortRange:
    """The ports the engine publishes containers on when none is asked for: the host's
    ephemeral range, which dockerd reads at start."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return PortRange(low=int(low), high=int(high))
    except (OSError, ValueError):
        return PortRange(low=32768, high=60999)


def worker_local_range(engine: PortRange) -> str:
    """A worker's own ephemeral range, below the engine's: a port the worker binds for
    itself must never be one iptables sends to the engine host."""
    if engine.low - 1 < 10000 + 4096:
        raise ConfigError(
            f"the engine publishes on ports {engine}, which leaves no room below for the "
            "worker hosts' own ephemeral ports",
            fix="raise net.ipv4.ip_local_port_range's low end to 20000 or more and restart "
            "the Docker engine",
        )
    return f"10000 {engine.low - 1}"


def _labels(t: Topology, role: str) -> dict[str, str]:
    return {LABEL: t.name, ROLE_LABEL: role}


def _get(client: docker.DockerClient, name: str) -> Any:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def _ensure_network(client: docker.DockerClient, t: Topology) -> str:
    """The topology's network; returns its gateway address (the relay's)."""
    nets = client.networks.list(names=[t.network])
    net = next((n for n in nets if n.name == t.network), None)
    if net is None:
        net = client.networks.create(t.network, driver="bridge", labels={LABEL: t.name})
    net.reload()
    configs = net.attrs.get("IPAM", {}).get("Config") or []
    gateway = next((c.get("Gateway") for c in configs if c.get("Gateway")), None)
    if not gateway:
        raise ServiceError(
            f"network {t.network} has no gateway address for the relay",
            fix=f"`docker network rm {t.network}` and run `gantry topology up` again",
        )
    return str(gateway)


def _secret(path: Path, nbytes: int = 32) -> str:
    """A random secret kept at ``path`` (0600), made once."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, secrets.token_hex(nbytes) + "\n", mode=0o600)
    return path.read_text().strip()


def _run(client: docker.DockerClient, t: Topology, role: str, **kwargs: Any) -> Any:
    """Start ``role``'s container unless it runs; a dead one is replaced."""
    name = t.container(role)
    if (c := _get(client, name)) is not None:
        if c.status == "running" and c.image.tags and t.image in c.image.tags:
            return c
        # Dead, or of another checkout's image: what it ran is lost either way (a release
        # it ran is crashed and resumes when delivered again).
        log.info("replacing %s (%s)", name, c.status if c.status != "running" else "new image")
        c.remove(force=True)
    log.info("starting %s", name)
    if kwargs.get("network"):
        # Its role is its name on the network (the workers know the control host so).
        kwargs["networking_config"] = {
            kwargs["network"]: client.api.create_endpoint_config(aliases=[role])
        }
    return client.containers.run(
        t.image,
        name=name,
        hostname=role,
        detach=True,
        init=True,  # reaps the services each host starts
        labels=_labels(t, role),
        **kwargs,
    )


def _same_path(path: Path, mode: str = "rw") -> dict[str, dict[str, str]]:
    return {str(path): {"bind": str(path), "mode": mode}}


#: Where the hosts find the CA bundle of the engine host (mounted over Debian's own).
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: The engine host's package-index settings, passed on: a worker downloads the wheels of
#: the runtime images it builds as this host would.
_PIP_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's Python trusts ($SSL_CERT_FILE, else OpenSSL's default):
    the hosts trust the same authorities (a TLS-inspecting proxy's among them)."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def _trust() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Environment and mounts that give a host this host's CA bundle and index settings."""
    env = {k: os.environ[k] for k in _PIP_ENV if os.environ.get(k)}
    bundle = host_ca_bundle()
    if bundle is None:
        return env, {}
    env |= {"SSL_CERT_FILE": CA_BUNDLE, "REQUESTS_CA_BUNDLE": CA_BUNDLE, "PIP_CERT": CA_BUNDLE}
    return env, {str(bundle): {"bind": CA_BUNDLE, "mode": "ro"}}


def _common_env(t: Topology) -> dict[str, str]:
    return {
        **_trust()[0],
        "GANTRY_TOPOLOGY": "multi",
        "GANTRY_PROJECT_DIR": str(t.project_dir),
        "PYTHONUNBUFFERED": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "gantry",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


def _start_relay(client: docker.DockerClient, t: Topology, gateway: str, engine: PortRange) -> None:
    _run(
        client,
        t,
        "relay",
        network_mode="host",
        command=[
            "python",
            "-m",
            "gantry.localenv.loopback",
            "relay",
            "--listen",
            f"{gateway}:{t.ports.relay}",
            "--token-file",
            str(t.token_file),
            "--ports",
            str(engine),
            "--ports",
            str(t.ports.registry),
        ],
        volumes=_same_path(t.secrets_dir, "ro"),
    )


def _searchable(top: Path, leaf: Path) -> None:
    """o+x (search, not listing) on ``leaf`` and its parents up to ``top``: the control
    host's PostgreSQL runs as its own user and must reach its cluster under them."""
    for d in [leaf, *leaf.parents]:
        d.chmod(d.stat().st_mode & 0o777 | 0o001)
        if d == top:
            return


def _start_control(client: docker.DockerClient, t: Topology, settings: Settings) -> None:
    state = t.state_dir("control")
    state.mkdir(parents=True, exist_ok=True)
    if settings.state_dir in state.parents:
        _searchable(settings.state_dir, state)
    _run(
        client,
        t,
        "control",
        network=t.network,
        command=["gantry", "topology", "control", "--root", str(t.root)],
        environment={
            **_common_env(t),
            "GANTRY_STATE_DIR": str(state),
            "GANTRY_LOCAL_REGISTRY_ADDR": f"0.0.0.0:{CONTROL_PORTS['registry']}",
            "GANTRY_HUB_ADDR": f"0.0.0.0:{CONTROL_PORTS['hub']}",
            "GANTRY_MLFLOW_ADDR": f"0.0.0.0:{CONTROL_PORTS['mlflow']}",
            "GANTRY_PREFECT_PORT": str(CONTROL_PORTS["prefect"]),
            # All of the control container's interfaces: its private network and loopback.
            "GANTRY_PREFECT_HOST": "0.0.0.0",  # noqa: S104
            # What a browser on the engine host reaches.
            "PREFECT_UI_API_URL": f"{t.prefect_url}/api",
            "PREFECT_UI_URL": t.prefect_url,
            # MLflow refuses Host headers but localhost's and private IPs' (DNS
            # rebinding): the workers ask for it by name, this host by loopback port.
            "MLFLOW_SERVER_ALLOWED_HOSTS": f"{CONTROL_HOST}:{CONTROL_PORTS['mlflow']},"
            "127.0.0.1:*,localhost:*",
        },
        ports={
            f"{CONTROL_PORTS[k]}/tcp": ("127.0.0.1", getattr(t.ports, k)) for k in CONTROL_PORTS
        },
        volumes={
            **_same_path(t.root / "hosts" / "control"),
            **_same_path(t.project_dir, "ro"),
            **_same_path(t.spec_root, "ro"),
            **_same_path(t.secrets_dir, "ro"),
            **_same_path(t.webhook_config, "ro"),
            **_same_path(t.root / "topology.json", "ro"),
            **_trust()[1],
        },
    )
    client.networks.get(t.network).reload()


def worker_env(t: Topology, role: str, settings: Settings) -> dict[str, str]:
    c = CONTROL_HOST
    return {
        **_common_env(t),
        "GANTRY_STATE_DIR": str(t.state_dir(role)),
        "GANTRY_DEPLOYMENTS_DIR": str(t.deployments_dir),
        "GANTRY_BUILT_WHEELS_DIR": str(settings.built_wheels_dir),
        # The engine pushes to it on its loopback; the worker reaches it through the relay.
        "GANTRY_REGISTRY": f"127.0.0.1:{t.ports.registry}",
        "MLFLOW_TRACKING_URI": f"http://{c}:{CONTROL_PORTS['mlflow']}",
        "HF_ENDPOINT": f"http://{c}:{CONTROL_PORTS['hub']}",
        "HF_HUB_DISABLE_XET": "1",
        "PREFECT_API_URL": f"http://{c}:{CONTROL_PORTS['prefect']}/api",
        "PREFECT_UI_URL": t.prefect_url,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    }


def _start_worker(
    client: docker.DockerClient,
    t: Topology,
    role: str,
    settings: Settings,
    gateway: str,
    engine: PortRange,
) -> None:
    state = t.state_dir(role)
    (state / "keys").mkdir(parents=True, exist_ok=True)
    settings.built_wheels_dir.mkdir(parents=True, exist_ok=True)
    _run(
        client,
        t,
        role,
        network=t.network,
        command=[
            "gantry",
            "topology",
            "worker",
            "--relay",
            f"{gateway}:{t.ports.relay}",
            "--token-file",
            str(t.token_file),
            "--redirect",
            str(engine),
            "--redirect",
            str(t.ports.registry),
            "--pool",
            WORK_POOL,
        ],
        environment=worker_env(t, role, settings),
        cap_add=["NET_ADMIN"],  # its own iptables rules, in its own network namespace
        sysctls={"net.ipv4.ip_local_port_range": worker_local_range(engine)},
        volumes={
            "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
            **_same_path(state),
            **_same_path(t.project_dir, "ro"),
            **_same_path(t.spec_root, "ro"),
            **_same_path(t.deployments_dir),
            **_same_path(settings.built_wheels_dir),
            **_same_path(t.secrets_dir, "ro"),
            # One signing key for every worker: each host's default key dir is this one.
            str(t.keys_dir): {"bind": str(state / "keys"), "mode": "ro"},
            **_trust()[1],
        },
    )


def _wait(what: str, check: Callable[[], bool], timeout_s: float, hint: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise ServiceError(f"{what} did not come up within {timeout_s:.0f}s", fix=hint)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=3).status_code == 200
    except requests.RequestException:
        return False


def _exited(client: docker.DockerClient, name: str) -> str | None:
    """The last log lines of ``name`` if it is not running (None while it runs)."""
    c = _get(client, name)
    if c is not None and c.status in ("running", "created"):
        return None
    tail = c.logs(tail=20).decode(errors="replace") if c is not None else "(no container)"
    return redact_text(tail)


def _healthy(client: docker.DockerClient, t: Topology, role: str, url: str) -> Callable[[], bool]:
    def check() -> bool:
        if (tail := _exited(client, t.container(role))) is not None:
            raise ServiceError(
                f"{t.container(role)} stopped while starting; its last lines:\n{tail}",
                fix=f"`docker logs {t.container(role)}`; `gantry topology up` starts it again",
            )
        return _answers(url)

    return check


def write_webhook_config(t: Topology) -> None:
    """The control host's webhook receiver: generic deliveries name a spec file of the
    checkout (the spec root); the secret comes from ``secrets/webhook.secret``."""
    write_atomic(
        t.webhook_config,
        "# Written by `gantry topology up`.\n"
        "deployment: release/release\n"
        f"spec_root: {t.spec_root}\n",
    )


def up(
    client: docker.DockerClient,
    settings: Settings,
    t: Topology,
    *,
    online: Callable[[Topology], list[str]],
    timeout_s: float = 600,
) -> Topology:
    """Bring the topology up (idempotent: what runs is kept); ``online`` lists the worker
    names the Prefect server sees polling the work pool."""
    engine = engine_port_range()
    worker_local_range(engine)  # refuses a range with no room before anything starts
    t = t.model_copy(update={"image": ensure_image(client, settings, t.project_dir)})
    save_topology(t)
    _secret(t.token_file)
    _secret(t.webhook_secret_file)
    t.deployments_dir.mkdir(parents=True, exist_ok=True)
    write_webhook_config(t)
    if not (t.keys_dir / "cosign.key").is_file():
        from gantry.adapters.model_signing import generate_weights_key
        from gantry.signing.image import generate_keypair

        t.keys_dir.mkdir(parents=True, exist_ok=True)
        generate_keypair(t.keys_dir, "")
        generate_weights_key(t.keys_dir, None)
        log.warning(
            "generated the topology's signing keys in %s WITHOUT a password: a demo; "
            "production mounts its own (README, Production setup)",
            t.keys_dir,
        )
    # The demo model, published here into the control host's hub store: this host
    # reaches the package index its wheels come from, the containers may not.
    from gantry.localhub.demo import assemble_demo
    from gantry.localhub.store import HubStore

    demo = assemble_demo(HubStore(hub_store(t)), settings.demo_wheels_dir)
    log.info("demo repository %s ready in the control host's hub", demo.repo_id)
    gateway = _ensure_network(client, t)
    _start_relay(client, t, gateway, engine)
    _start_control(client, t, settings)
    _wait(
        "the control host",
        _healthy(client, t, "control", f"http://127.0.0.1:{t.ports.webhook}/health"),
        timeout_s,
        f"`docker logs {t.container('control')}`",
    )
    for role in t.worker_roles():
        _start_worker(client, t, role, settings, gateway, engine)
    names = {f"gantry-{r}" for r in t.worker_roles()}

    def all_online() -> bool:
        for role in t.worker_roles():
            if (tail := _exited(client, t.container(role))) is not None:
                raise ServiceError(
                    f"{t.container(role)} stopped while starting; its last lines:\n{tail}",
                    fix=f"`docker logs {t.container(role)}`",
                )
        return names <= set(online(t))

    _wait(
        f"{t.workers} worker(s) polling {WORK_POOL}",
        all_online,
        timeout_s,
        f"`docker logs {t.container(t.worker_roles()[0])}` (and the other workers')",
    )
    return t


def down(client: docker.DockerClient, t: Topology, *, purge: bool = False) -> list[str]:
    """Remove the topology's containers, the model containers its workers started and its
    network; its state stays for the next `up` unless ``purge``."""
    from gantry.deploy.docker import remove_deployments

    removed: list[str] = []
    # Workers first: a worker would otherwise lose its server mid-run.
    order = {"relay": 2, "control": 1}
    found = client.containers.list(all=True, filters={"label": f"{LABEL}={t.name}"})
    for c in sorted(found, key=lambda c: order.get(c.labels.get(ROLE_LABEL, ""), 0)):
        c.remove(force=True)
        removed.append(c.name)
    if n := remove_deployments(client, t.deployments_dir):
        removed.append(f"{n} deployment container(s)")
    for net in client.networks.list(names=[t.network]):
        if net.name == t.network:
            try:
                net.remove()
            except docker.errors.APIError as exc:
                raise DockerUnavailableError(
                    f"network {t.network} is still in use: {exc.explanation or exc}",
                    fix=f"`docker network inspect {t.network}` names what is attached",
                ) from None
    if purge:
        _purge(t.root)
    return removed


def _purge(root: Path) -> None:
    # Report what cannot be deleted (a file another user made there) rather than stop
    # half-way through.
    shutil.rmtree(root, onerror=lambda f, p, e: log.warning("kept %s: %s", p, e[1]))


def remove_hosts(client: docker.DockerClient, t: Topology, roles: Iterable[str]) -> None:
    """Remove the containers of ``roles`` (e.g. the workers `up --workers` no longer has)."""
    for role in roles:
        if (c := _get(client, t.container(role))) is not None:
            log.info("removing %s", c.name)
            c.remove(force=True)


def status(client: docker.DockerClient, t: Topology, online: Iterable[str]) -> dict[str, Any]:
    alive = set(online)
    hosts: dict[str, Any] = {}
    for role in ["relay", "control", *t.worker_roles()]:
        c = _get(client, t.container(role))
        entry: dict[str, Any] = {"container": t.container(role)}
        entry["state"] = c.status if c is not None else "absent"
        if c is not None and role != "relay":
            nets = c.attrs.get("NetworkSettings", {}).get("Networks", {})
            entry["address"] = (nets.get(t.network) or {}).get("IPAddress") or None
        if role.startswith("worker-"):
            entry["online"] = f"gantry-{role}" in alive
            entry["state_dir"] = str(t.state_dir(role))
        hosts[role] = entry
    return {
        "name": t.name,
        "image": t.image,
        "prefect_ui": t.prefect_url,
        "webhook": t.webhook_url,
        "registry": f"127.0.0.1:{t.ports.registry}",
        "hub": f"http://127.0.0.1:{t.ports.hub}",
        "mlflow": f"http://127.0.0.1:{t.ports.mlflow}",
        "deployments_dir": str(t.deployments_dir),
        "hosts": hosts,
    }


#: The worker's own nat chain: Docker's rules in the same table (its embedded DNS server
#: at 127.0.0.11) are left as they are.
REDIRECT_CHAIN = "GANTRY_LOOPBACK"


def setup_redirects(ranges: Iterable[PortRange], to_port: int) -> list[list[str]]:
    """The iptables argvs that send this host's TCP to 127.0.0.1 on ``ranges`` to the
    forwarder on ``to_port`` (a worker's own network namespace: nothing else sees them).
    Run in order, each once: the chain is made anew and jumped to from OUTPUT."""
    nat = ["iptables", "-w", "-t", "nat"]
    argvs = [
        [*nat, "-N", REDIRECT_CHAIN],
        [*nat, "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1/32", "-j", REDIRECT_CHAIN],
    ]
    for r in ranges:
        dport = f"{r.low}:{r.high}" if r.low != r.high else str(r.low)
        argvs.append(
            [
                *nat,
                "-A",
                REDIRECT_CHAIN,
                "-p",
                "tcp",
                "--dport",
                dport,
                "-j",
                "REDIRECT",
                "--to-ports",
                str(to_port),
            ]
        )
    return argvs


def start_forwarder(run_dir: Path, relay: str, token_file: Path) -> subprocess.Popen[bytes]:
    """The worker's half of the loopback bridge, as a child with its log under ``run_dir``;
    returns once it listens."""
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "loopback.log").open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gantry.localenv.loopback",
                "forward",
                "--listen",
                f"127.0.0.1:{FORWARD_PORT}",
                "--relay",
                relay,
                "--token-file",
                str(token_file),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"the loopback forwarder exited with {proc.returncode}",
                fix=f"read {run_dir / 'loopback.log'}",
            )
        try:
            socket.create_connection(("127.0.0.1", FORWARD_PORT), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise ServiceError("the loopback forwarder did not listen within 30s")
