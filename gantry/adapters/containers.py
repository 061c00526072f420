"""Run a model image as a hardened, labelled, always-removed container (docker-py).

Prefect-free. The container runs as non-root with a read-only root filesystem, no
capabilities, no privilege escalation, CPU/memory/pid limits, the weights mounted
read-only and its port published on 127.0.0.1 only. Every container carries the release's
labels so :func:`remove_leftovers` can clean up after a run that was killed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import docker.errors
import httpx
import requests
from docker.types import DeviceRequest

from gantry.adapters.docker_engine import DockerClient
from gantry.errors import (
    AcceleratorError,
    ContainerEngineError,
    ContainerStartError,
    DockerUnavailableError,
    HealthTimeoutError,
    ImageReferenceError,
)
from gantry.proc import redact_text
from gantry.spec import Accelerator
from gantry.tls import tls_context

log = logging.getLogger(__name__)

RELEASE_LABEL = "ai.gantry.release"
STAGE_LABEL = "ai.gantry.stage"
#: Used when the image's USER is root or unset: the reference runtime's fixed uid/gid.
DEFAULT_USER = "10001:10001"
DEFAULT_PIDS_LIMIT = 512
TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}  # noqa: S108 - a private tmpfs, not the host's
LOG_TAIL = 60

_DIGEST_REF = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
_GPU_FIX = (
    "install the NVIDIA Container Toolkit on the Docker host and run "
    "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`; "
    "or set smoke.accelerator: cpu (or auto) to run without a GPU"
)


def check_digest_ref(image: str) -> str:
    """``image`` if it is ``repo@sha256:<64 hex>``; a tag could move under our feet."""
    if not _DIGEST_REF.match(image):
        raise ImageReferenceError(
            f"refusing to run {image!r}: containers are run by digest only",
            fix="pass the image as <registry>/<repository>@sha256:… (the build stage's "
            "BuildResult.image), never by tag",
        )
    return image


def gpu_runtime_available(info: Mapping[str, Any]) -> bool:
    """Whether ``docker info`` shows an NVIDIA runtime or CDI-discovered NVIDIA GPUs."""
    if "nvidia" in (info.get("Runtimes") or {}):
        return True
    # Docker >= 27 lists CDI devices it discovered; older engines lack the key.
    devices = info.get("DiscoveredDevices") or []
    return any(str(d.get("ID", "")).startswith("nvidia.com/gpu") for d in devices)


def resolve_gpus(info: Mapping[str, Any], accelerator: Accelerator, gpus: int) -> int | None:
    """GPUs to request: ``None`` for CPU. ``gpu`` without a GPU runtime fails at once."""
    if accelerator is Accelerator.CPU:
        return None
    available = gpu_runtime_available(info)
    if accelerator is Accelerator.GPU and not available:
        runtimes = ", ".join(sorted(info.get("Runtimes") or {})) or "none"
        raise AcceleratorError(
            f"smoke.accelerator is gpu but the Docker engine has no NVIDIA runtime "
            f"(runtimes: {runtimes}) and no CDI GPU devices",
            fix=_GPU_FIX,
        )
    return gpus if available else None


def container_user(image_user: str | None) -> str:
    """The image's USER when it is non-root, else :data:`DEFAULT_USER`; never root."""
    user = (image_user or "").strip()
    if user.split(":")[0] in ("", "root", "0"):
        return DEFAULT_USER
    return user


def run_kwargs(
    image: str,
    *,
    weights_dir: Path,
    mount_point: str,
    port: int,
    env: Mapping[str, str],
    args: Sequence[str],
    cpus: float,
    memory_mb: int,
    gpus: int | None,
    labels: Mapping[str, str],
    user: str,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    network: str = "bridge",
    name: str | None = None,
) -> dict[str, Any]:
    """The docker-py ``containers.create``/``run`` keyword arguments (pure; unit-tested)."""
    if RELEASE_LABEL not in labels:
        raise ValueError(f"labels must carry {RELEASE_LABEL} so leftovers can be removed")
    kwargs: dict[str, Any] = {
        "image": check_digest_ref(image),
        "command": list(args) or None,
        "detach": True,
        "user": user,
        "read_only": True,
        "tmpfs": dict(TMPFS),
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "nano_cpus": int(cpus * 1e9),
        "mem_limit": f"{memory_mb}m",
        # Equal to mem_limit: no swap, so an undersized limit fails fast instead of crawling.
        "memswap_limit": f"{memory_mb}m",
        "pids_limit": pids_limit,
        "volumes": {str(weights_dir): {"bind": mount_point, "mode": "ro"}},
        # Loopback only, ephemeral host port: nothing outside this host can reach it, and
        # parallel runs never collide.
        "ports": {f"{port}/tcp": ("127.0.0.1", None)},
        "network": network,
        "environment": dict(env),
        "labels": dict(labels),
    }
    if name:
        kwargs["name"] = name
    if gpus:
        kwargs["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return kwargs


def _engine_error(what: str, exc: docker.errors.APIError) -> Exception:
    detail = redact_text(str(exc.explanation or exc))
    if exc.is_server_error():
        low = detail.lower()
        if "nvidia" in low or "gpu" in low or "device driver" in low:
            return AcceleratorError(f"{what} failed: {detail}", fix=_GPU_FIX)
        return ContainerEngineError(
            f"{what} failed: {detail}", fix="check `docker info`; the stage retries"
        )
    return ContainerStartError(f"{what} was refused: {detail}")


@dataclass
class RunningContainer:
    """A started container; use as a context manager so it is always removed."""

    client: DockerClient
    container: Any
    image: str
    host_port: int
    started_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return str(self.container.id)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"

    def state(self) -> dict[str, Any]:
        """The container's State (Status, ExitCode, OOMKilled, …), freshly read."""
        self.container.reload()
        return dict(self.container.attrs.get("State") or {})

    def logs(self, tail: int = LOG_TAIL) -> str:
        """The last ``tail`` lines of stdout+stderr, secrets redacted; never raises."""
        try:
            raw = self.container.logs(stdout=True, stderr=True, tail=tail)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            return f"(logs unavailable: {exc})"
        return redact_text(bytes(raw).decode("utf-8", errors="replace"))

    def remove(self) -> None:
        """Kill and remove the container (and its anonymous volumes); idempotent."""
        try:
            self.container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("could not remove container %s: %s", self.id[:12], exc)

    def __enter__(self) -> RunningContainer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _host_port(container: Any, port: int, deadline_s: float = 10) -> int | None:
    """The ephemeral host port; None if the container stopped before it was bound."""
    end = time.monotonic() + deadline_s
    while True:
        container.reload()
        bound = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp")
        if bound:
            return int(bound[0]["HostPort"])
        if container.status != "running" or time.monotonic() > end:
            return None
        time.sleep(0.1)


def image_config(client: DockerClient, image: str) -> dict[str, Any]:
    """The image's Config (User, Healthcheck, …); pulled by digest first when not local."""
    try:
        try:
            return dict(client.api.inspect_image(image).get("Config") or {})
        except docker.errors.ImageNotFound:
            # create() does not pull; the digest pins exactly what was verified.
            client.images.pull(image)
            return dict(client.api.inspect_image(image).get("Config") or {})
    except docker.errors.NotFound as exc:
        raise ContainerStartError(
            f"image {image} is neither local nor pullable: {exc.explanation or exc}",
            fix="check the registry holds the image (`gantry env status`) and re-run build",
        ) from None
    except docker.errors.APIError as exc:
        raise _engine_error(f"getting {image}", exc) from None
    except requests.RequestException as exc:
        raise DockerUnavailableError(f"lost the Docker engine: {exc}") from None


def run_hardened(
    client: DockerClient,
    image: str,
    *,
    weights_dir: Path,
    mount_point: str,
    port: int,
    env: Mapping[str, str],
    args: Sequence[str],
    cpus: float,
    memory_mb: int,
    gpus: int | None,
    labels: Mapping[str, str],
    network: str = "bridge",
    name: str | None = None,
) -> RunningContainer:
    """Start ``image`` (by digest) hardened; the caller must use the result in ``with``
    (or own its removal, as a deployment does).

    ``network`` is a Docker network to join (a deployment's private one, where the router
    finds the container by ``name``); the port is published on loopback either way.

    Created and started in two calls (what ``containers.run(detach=True)`` does) so a
    failed or interrupted start removes the container instead of leaving it behind.
    """
    check_digest_ref(image)
    if gpus and not gpu_runtime_available(client.info()):
        raise AcceleratorError(f"{gpus} GPU(s) asked for but the engine has none", fix=_GPU_FIX)
    config = image_config(client, image)
    kwargs = run_kwargs(
        image,
        weights_dir=weights_dir,
        mount_point=mount_point,
        port=port,
        env=env,
        args=args,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=gpus,
        labels=labels,
        user=container_user(config.get("User")),
        network=network,
        name=name,
    )
    kwargs.pop("detach")  # create() is always detached
    try:
        container = client.containers.create(**kwargs)
    except docker.errors.ImageNotFound as exc:
        raise ContainerStartError(
            f"image {image} is neither local nor pullable: {exc.explanation or exc}",
            fix="check the registry holds the image (`gantry env status`) and re-run build",
        ) from None
    except docker.errors.APIError as exc:
        raise _engine_error(f"creating a container from {image}", exc) from None
    except requests.RequestException as exc:
        raise DockerUnavailableError(f"lost the Docker engine: {exc}") from None
    try:
        started_at = time.monotonic()
        try:
            container.start()
        except docker.errors.APIError as exc:
            raise _engine_error(f"starting {image}", exc) from None
        host_port = _host_port(container, port)
        running = RunningContainer(client, container, image, host_port or 0, started_at)
        if host_port is None:
            st = running.state()
            raise ContainerStartError(
                f"container {running.id[:12]} of {image} stopped before its port {port} was "
                f"published (exit code {st.get('ExitCode')})",
                exit_code=st.get("ExitCode"),
                logs_tail=running.logs(),
                fix="read the log lines above: the runtime crashed on start-up",
            )
        return running
    except BaseException:
        # Also on KeyboardInterrupt: a half-started container must not outlive the call.
        with contextlib.suppress(Exception):
            container.remove(force=True, v=True)
        raise


def remove_leftovers(client: DockerClient, release_id: str, stage: str | None = None) -> int:
    """Remove containers labelled for ``release_id`` (and ``stage``); how many were."""
    filters = [f"{RELEASE_LABEL}={release_id}"]
    if stage:
        filters.append(f"{STAGE_LABEL}={stage}")
    removed = 0
    for c in client.containers.list(all=True, filters={"label": filters}):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True, v=True)
            removed += 1
            log.info("removed leftover container %s of release %s", c.short_id, release_id)
    return removed


def wait_healthy(
    running: RunningContainer, health_path: str, deadline_s: float, poll_s: float = 0.25
) -> tuple[float, dict[str, Any]]:
    """Poll ``health_path`` until 200; return (seconds since start, JSON body).

    Raises ContainerStartError when the container exits first, HealthTimeoutError at the
    deadline, and fails early when the runtime reports a definitive load error
    (``{"status": "error"}``, the reference runtime's contract) since waiting cannot help.
    """
    url = running.base_url + health_path
    end = running.started_at + deadline_s
    last = "no answer yet"
    with httpx.Client(timeout=2.0, trust_env=False, verify=tls_context()) as http:
        while True:
            st = running.state()
            if st.get("Status") not in ("running", "created"):
                oom = " (killed for exceeding its memory limit)" if st.get("OOMKilled") else ""
                raise ContainerStartError(
                    f"container {running.id[:12]} exited with code {st.get('ExitCode')}{oom} "
                    f"before {health_path} answered 200",
                    exit_code=st.get("ExitCode"),
                    logs_tail=running.logs(),
                    fix="raise smoke.memory_mb"
                    if oom
                    else "read the log lines above: the runtime crashed on start-up (bad "
                    "runtime.args/env, weights at the wrong runtime.model_mount?)",
                )
            try:
                r = http.get(url)
                if r.status_code == 200:
                    elapsed = time.monotonic() - running.started_at
                    try:
                        body = r.json()
                    except ValueError:
                        body = {}
                    return elapsed, body if isinstance(body, dict) else {}
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code >= 500 and _reports_error(r):
                    raise ContainerStartError(
                        f"{url} reports the model cannot be served: {last}",
                        logs_tail=running.logs(),
                        fix="read the error above: the weights at runtime.model_mount (or "
                        "runtime.env MODEL_PATH) are missing or unreadable",
                    )
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= end:
                raise HealthTimeoutError(
                    f"{url} did not answer 200 within {deadline_s:.0f}s of the container "
                    f"starting (last: {last})",
                    logs_tail=running.logs(),
                    fix="read the log lines above; if the model is just slow to load, raise "
                    "smoke.deadline_s (and the image's HEALTHCHECK --start-period)",
                )
            time.sleep(poll_s)


def _reports_error(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "error"
