"""Adapter for the Docker engine (docker-py): connect, build, push, inspect.

Prefect-free. Errors map to Gantry's: engine unreachable, build failures with the last
log lines, registry trouble as transient.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import requests

from gantry.errors import (
    BuildError,
    DockerUnavailableError,
    RegistryError,
    RegistryUnavailableError,
)
from gantry.proc import redact_text

if TYPE_CHECKING:
    from gantry.stages.build import Layer

log = logging.getLogger(__name__)

from docker import DockerClient as DockerClient  # noqa: E402  (untyped: Any to mypy)


def connect(timeout_s: float = 600) -> DockerClient:
    """A client for the engine named by DOCKER_HOST (default socket), checked with a ping."""
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine: {redact_text(str(exc))[:300]}"
        ) from None
    return client


def _api(timeout_s: float) -> docker.APIClient:
    """A low-level client with its own timeout, for the long calls (build, push, pull)."""
    return docker.from_env(timeout=int(timeout_s)).api


def image_exists(client: DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)")


def build(
    client: DockerClient,
    context: Path,
    *,
    tag: str,
    target: str | None,
    labels: Mapping[str, str],
    timeout_s: float,
    nocache: bool = False,
    buildargs: Mapping[str, str] | None = None,
) -> str:
    """Build ``context`` (legacy builder, no pull) and return the image id.

    Streams the build log to the logger step by step; a failing step raises BuildError with
    the tail of the log, which is what a user needs to fix a Dockerfile.
    """
    tail: list[str] = []
    image_id: str | None = None
    api = _api(timeout_s)
    try:
        stream: Iterator[dict[str, Any]] = api.build(
            path=str(context),
            tag=tag,
            target=target,
            labels=dict(labels),
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            nocache=nocache,
            buildargs=dict(buildargs or {}),
        )
        for chunk in stream:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise BuildError(
                    f"docker build failed: {detail.strip()}\n" + "\n".join(tail[-15:]),
                    fix=f"fix the Dockerfile step shown above (the build context is {context})",
                )
            if line := chunk.get("stream", "").rstrip():
                tail.append(line)
                if m := _STEP.match(line):
                    log.info("build step %s/%s: %s", m[1], m[2], m[3][:160])
            if aux := chunk.get("aux"):
                image_id = aux.get("ID", image_id)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DockerUnavailableError(f"lost the Docker engine during the build: {exc}") from None
    except docker.errors.APIError as exc:
        raise BuildError(f"docker build was refused: {exc.explanation or exc}") from None
    finally:
        api.close()
    if image_id is None:
        image_id = client.images.get(tag).id
    return image_id


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def push(client: DockerClient, repository: str, tag: str, timeout_s: float) -> str:
    """Push ``repository:tag``; return the manifest digest the registry reports."""
    api = _api(timeout_s)
    digest: str | None = None
    try:
        for chunk in api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                msg = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                _raise_push_error(repository, msg)
            if aux := chunk.get("aux"):
                digest = aux.get("Digest", digest)
            elif "digest:" in (status := chunk.get("status", "")) and (m := _DIGEST.search(status)):
                digest = m[0]
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise RegistryUnavailableError(f"push of {repository}:{tag} broke off: {exc}") from None
    except docker.errors.APIError as exc:
        _raise_push_error(repository, str(exc.explanation or exc))
    finally:
        api.close()
    if digest is None:
        raise RegistryError(f"the registry accepted {repository}:{tag} but reported no digest")
    return digest


def _raise_push_error(repository: str, msg: str) -> None:
    msg = redact_text(msg)
    lowered = msg.lower()
    if any(
        s in lowered
        for s in (
            "connection refused",
            "no such host",
            "timeout",
            "i/o timeout",
            "503",
            "502",
            "500",
            "eof",
            "connection reset",
        )
    ):
        raise RegistryUnavailableError(
            f"the registry for {repository} is unavailable: {msg}",
            fix="check the registry is up (`gantry env status`); the stage retries",
        )
    if any(s in lowered for s in ("unauthorized", "denied", "authentication required")):
        raise RegistryError(
            f"the registry refused {repository}: {msg}",
            fix="log in to the registry (`docker login <registry>`) with push rights",
        )
    raise RegistryError(f"pushing {repository} failed: {msg}")


def layers(client: DockerClient, image_id: str) -> list[Layer]:
    """The image's history, newest first, as Layer records."""
    from gantry.stages.build import Layer  # here: the build stage imports this adapter

    out = []
    for h in client.api.history(image_id):
        created_by = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", h.get("CreatedBy") or "").strip()
        out.append(Layer(size_bytes=int(h.get("Size") or 0), created_by=created_by[:200]))
    return out


def image_size(client: DockerClient, image_id: str) -> int:
    return int(client.api.inspect_image(image_id).get("Size") or 0)


def pull(client: DockerClient, ref: str, timeout_s: float) -> bool:
    """Try to pull ``ref``; False (not an error) when no registry serves it here."""
    try:
        api = _api(timeout_s)
        try:
            repo, sep, tag = ref.rpartition(":")
            if not sep or "/" in tag:
                repo, tag = ref, "latest"
            for chunk in api.pull(repo, tag=tag, stream=True, decode=True):
                if "error" in chunk:
                    log.info("pull of %s failed: %s", ref, chunk["error"])
                    return False
        finally:
            api.close()
    except (docker.errors.APIError, requests.RequestException) as exc:
        log.info("pull of %s failed: %s", ref, exc)
        return False
    return image_exists(client, ref)
