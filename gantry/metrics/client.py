"""What the canary sends the exporter, and the token that proves it came from Gantry.

The exporter takes pushed figures (the quality probes' scores of a window) only with the
token in ``<state dir>/prometheus/exporter-token`` (0600, made once): the exporter's port
is on loopback, but an operator may bind it wider, and then a model server must still not
be able to write what the canary judges.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from gantry.atomicfile import write_atomic
from gantry.errors import MetricsUnavailableError

TOKEN_FILE = "exporter-token"  # noqa: S105 - a file name


def token_path(targets_dir: Path) -> Path:
    """The token file beside the scrape targets directory."""
    return targets_dir.parent / TOKEN_FILE


def load_or_create_token(path: Path) -> str:
    """The exporter's push token, created (0600) on first use."""
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if len(token) == 64:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    write_atomic(path, token, mode=0o600)
    return token


class QualityPush(BaseModel):
    """One slot's quality probe score in one analysis window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=500)
    slot: str = Field(pattern=r"^[ab]$")
    version: str = Field(min_length=1, max_length=100)
    metric: str = Field(min_length=1, max_length=50)
    window: str = Field(
        min_length=1,
        max_length=200,
        description="Names one analysis window (release, step, attempt): the query asks for "
        "exactly this window's score, so there is no range to extrapolate over.",
    )
    score: float = Field(ge=0, le=1)
    items: int = Field(ge=0)


class ExporterClient:
    """Sends the exporter what only Gantry may send it."""

    def __init__(self, url: str, token: str, timeout_s: float = 5.0) -> None:
        self.url, self._token, self._timeout_s = url.rstrip("/"), token, timeout_s

    def push_quality(self, push: QualityPush) -> None:
        try:
            r = httpx.post(
                f"{self.url}/canary/quality",
                json=push.model_dump(),
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self._timeout_s,
                trust_env=False,
            )
        except httpx.HTTPError as exc:
            raise MetricsUnavailableError(
                f"the metrics exporter at {self.url} did not take the quality score: {exc}",
                fix="`gantry env up` starts it; `gantry env status` shows where it is",
            ) from None
        if r.status_code != 204:
            raise MetricsUnavailableError(
                f"the metrics exporter at {self.url} refused the quality score: "
                f"HTTP {r.status_code} {r.text[:200]}",
                fix="restart it (`gantry env down` then `gantry env up`) so it reads the "
                "current token",
            )
