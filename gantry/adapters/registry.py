"""Adapter for an OCI distribution registry's HTTP API (v2). Prefect-free."""

from __future__ import annotations

import httpx

from gantry.errors import RegistryError, RegistryUnavailableError

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


class RegistryClient:
    """Plain-HTTP client for a local registry, or HTTPS for a remote one."""

    def __init__(
        self, address: str, *, timeout_s: float = 30, insecure: bool | None = None
    ) -> None:
        self.address = address
        local = address.startswith(("127.", "localhost", "[::1]"))
        scheme = "http" if (insecure if insecure is not None else local) else "https"
        self.base = f"{scheme}://{address}"
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw: object) -> httpx.Response:
        try:
            r = self._http.request(method, self.base + path, **kw)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"cannot reach the registry at {self.base}: {exc}",
                fix="start it with `gantry env up` (or check GANTRY_REGISTRY)",
            ) from None
        if r.status_code >= 500:
            raise RegistryUnavailableError(f"registry {self.base} answered {r.status_code}")
        return r

    def ping(self) -> None:
        r = self._request("GET", "/v2/")
        if r.status_code not in (200, 401):
            raise RegistryError(f"{self.base}/v2/ answered {r.status_code}; is it a registry?")

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
                fix="log in with `docker login` and retry",
            )
        if r.status_code != 200:
            raise RegistryError(
                f"registry {self.base} answered {r.status_code} for {repository}:{reference}"
            )
        digest: str | None = r.headers.get("Docker-Content-Digest")
        if not digest:
            raise RegistryError(f"registry {self.base} sent no Docker-Content-Digest header")
        return digest

    def tags(self, repository: str) -> list[str]:
        r = self._request("GET", f"/v2/{repository}/tags/list")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return list(r.json().get("tags") or [])
