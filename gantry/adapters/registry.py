"""Adapter for an OCI distribution registry's HTTP API (v2). Prefect-free.

Enough of the API to resolve tags, move blobs and manifests by digest, and list tags: what
the build stage and the built-in signer need. Content fetched by digest is checked against
that digest. No token authentication: registries that need a login answer 401, which is
reported as such (the build pushes through the Docker engine, which has the login).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx

from gantry.errors import RegistryError, RegistryUnavailableError
from gantry.tls import tls_context

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

_LOGIN_FIX = "log in with `docker login` and retry"


def is_loopback(address: str) -> bool:
    """Whether a registry address (``host[:port]``, ``[v6]:port``) is on this machine: the
    one predicate that allows plain HTTP (here, for trivy and for cosign).

    Decided on the parsed host, never by prefix or DNS: ``127.evil.example`` and
    ``localhost.evil.example`` are remote.
    """
    host = address.strip()
    if host.startswith("["):
        host, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, _, port = host.partition(":")
        if port and not port.isdigit():
            return False
        host = name
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: the content address registries use."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A manifest as the registry served it: the exact bytes, their type and digest."""

    raw: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        data = json.loads(self.raw)
        if not isinstance(data, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return data


class RegistryClient:
    """Plain-HTTP client for a local registry, or HTTPS for a remote one."""

    def __init__(
        self, address: str, *, timeout_s: float = 30, insecure: bool | None = None
    ) -> None:
        self.address = address
        plain = insecure if insecure is not None else is_loopback(address)
        scheme = "http" if plain else "https"
        self.base = f"{scheme}://{address}"
        self._http = httpx.Client(timeout=timeout_s, verify=tls_context())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self._request_url(method, self.base + path, **kw)

    def _request_url(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"cannot reach the registry at {self.base}: {exc}",
                fix="start it with `gantry env up` (or check GANTRY_REGISTRY)",
            ) from None
        if r.status_code >= 500:
            raise RegistryUnavailableError(f"registry {self.base} answered {r.status_code}")
        return r

    def _refuse(self, r: httpx.Response, what: str) -> RegistryError:
        """The error for an unexpected 4xx answer, with the registry's own reason."""
        if r.status_code in (401, 403):
            return RegistryError(
                f"registry {self.base} refused {what} ({r.status_code})", fix=_LOGIN_FIX
            )
        detail = ""
        try:
            errors = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            detail = r.text[:200]
        return RegistryError(
            f"registry {self.base} answered {r.status_code} for {what}"
            + (f": {detail}" if detail else "")
        )

    def ping(self) -> None:
        r = self._request("GET", "/v2/")
        if r.status_code not in (200, 401):
            raise RegistryError(f"{self.base}/v2/ answered {r.status_code}; is it a registry?")

    # --- manifests -------------------------------------------------------------------------

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """Digest of ``repository:reference`` (tag or digest), or None when absent."""
        r = self._request(
            "HEAD", f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}
        )
        if r.status_code == 404:
            return None
        if r.status_code in (401, 403):
            raise RegistryError(
                f"registry {self.base} refused to show {repository}",
                fix=_LOGIN_FIX,
            )
        if r.status_code != 200:
            raise RegistryError(
                f"registry {self.base} answered {r.status_code} for {repository}:{reference}"
            )
        digest: str | None = r.headers.get("Docker-Content-Digest")
        if not digest:
            raise RegistryError(f"registry {self.base} sent no Docker-Content-Digest header")
        return digest

    def get_manifest(
        self, repository: str, reference: str, *, accept: str = MANIFEST_TYPES
    ) -> Manifest | None:
        """The manifest at ``reference`` (tag or digest), or None when there is none.

        The bytes are checked against the digest asked for, or against the digest the
        registry reports for a tag.
        """
        r = self._request(
            "GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": accept}
        )
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._refuse(r, f"manifest {repository}:{reference}")
        raw = r.content
        digest = sha256_digest(raw)
        expected = reference if reference.startswith("sha256:") else None
        expected = expected or r.headers.get("Docker-Content-Digest")
        if expected and expected != digest:
            raise RegistryError(
                f"manifest {repository}:{reference} from {self.base} has digest {digest}, "
                f"not {expected}: the registry served other content than it names",
                fix="check the registry (and any proxy in front of it) for corruption",
            )
        media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type:
            media_type = str(json.loads(raw).get("mediaType") or "")
        return Manifest(raw=raw, media_type=media_type, digest=digest)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store ``raw`` under ``reference`` (a tag, or its own digest); return its digest."""
        r = self._request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            content=raw,
            headers={"Content-Type": media_type},
        )
        if r.status_code not in (200, 201):
            raise self._refuse(r, f"storing manifest {repository}:{reference}")
        digest = sha256_digest(raw)
        reported = r.headers.get("Docker-Content-Digest")
        if reported and reported != digest:
            raise RegistryError(
                f"registry {self.base} stored manifest {repository}:{reference} as {reported}, "
                f"but its bytes hash to {digest}"
            )
        return digest

    # --- blobs -----------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{repository}/blobs/{digest}", follow_redirects=True)
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise self._refuse(r, f"blob {repository}@{digest}")
        return True

    def get_blob(self, repository: str, digest: str) -> bytes:
        """The blob ``digest``, checked against it; RegistryError when it is absent."""
        r = self._request("GET", f"/v2/{repository}/blobs/{digest}", follow_redirects=True)
        if r.status_code == 404:
            raise RegistryError(
                f"blob {digest} is missing from {self.base}/{repository}",
                fix="the manifest that names it is broken; push the artifact again",
            )
        if r.status_code != 200:
            raise self._refuse(r, f"blob {repository}@{digest}")
        actual = sha256_digest(r.content)
        if actual != digest:
            raise RegistryError(
                f"blob {repository}@{digest} from {self.base} hashes to {actual}",
                fix="check the registry (and any proxy in front of it) for corruption",
            )
        return r.content

    def push_blob(self, repository: str, data: bytes) -> str:
        """Upload ``data`` (monolithically) unless the repository has it; return its digest."""
        digest = sha256_digest(data)
        if self.blob_exists(repository, digest):
            return digest
        r = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        if r.status_code != 202 or "Location" not in r.headers:
            raise self._refuse(r, f"starting an upload to {repository}")
        # Location may be relative or absolute, and may carry a query of its own.
        location = urljoin(self.base + "/", r.headers["Location"])
        sep = "&" if "?" in location else "?"
        r = self._request_url(
            "PUT",
            f"{location}{sep}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if r.status_code != 201:
            raise self._refuse(r, f"uploading blob {digest} to {repository}")
        return digest

    # --- tags ------------------------------------------------------------------------------

    def tags(self, repository: str) -> list[str]:
        """Every tag of ``repository`` ([] when it does not exist), following pagination."""
        out: list[str] = []
        url: str | None = f"{self.base}/v2/{repository}/tags/list"
        while url:
            r = self._request_url("GET", url)
            if r.status_code == 404:
                return out
            if r.status_code != 200:
                raise self._refuse(r, f"the tags of {repository}")
            out.extend(r.json().get("tags") or [])
            nxt = r.links.get("next", {}).get("url")
            url = urljoin(self.base + "/", nxt) if nxt else None
        return out

    def list_tags(self, repository: str) -> list[str]:
        """Alias of :meth:`tags`."""
        return self.tags(repository)
