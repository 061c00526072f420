"""What a deploy target must offer the canary: a weighted router and model servers.

One implementation per backend (:mod:`gantry.deploy.docker` for the local Docker engine);
a Kubernetes target implements the same two protocols (e.g. a Gateway API HTTPRoute's
backend weights and two Deployments). The canary logic only speaks these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gantry.adapters.haproxy import AccessRecord, Slot


@dataclass(frozen=True)
class Launch:
    """How to run one model version (the signed image, its verified weights)."""

    image: str
    weights_dir: Path
    mount_point: str
    port: int
    health_path: str
    env: Mapping[str, str]
    args: tuple[str, ...]
    cpus: float
    memory_mb: int
    gpus: int | None
    deadline_s: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerState:
    """A slot's server as the target sees it."""

    running: bool
    detail: str  # e.g. "running", "exited with code 137 (OOM)", "missing"


class Router(Protocol):
    """Routes the model's endpoint to the two slots by weight (percent)."""

    @property
    def endpoint(self) -> str:
        """The model's URL, e.g. ``http://127.0.0.1:8090``."""
        ...

    def ensure(self, weights: Mapping[Slot, int]) -> None:
        """Create the router (with ``weights``) if it is missing or dead; else keep it."""

    def set_weights(self, weights: Mapping[Slot, int]) -> None:
        """Change the weights live, without dropping a connection."""

    def retire(self, slot: Slot, drain_s: float) -> None:
        """Weight 0, let requests in flight finish (up to ``drain_s``), then take it out."""

    def readmit(self, slot: Slot) -> None:
        """Put a retired slot back into the rotation (its weight still decides)."""

    def observe(self) -> list[AccessRecord]:
        """Requests finished since the previous call."""
        ...


class ModelServers(Protocol):
    """Runs model versions in slots."""

    def start(self, slot: Slot, launch: Launch) -> float:
        """Start ``launch`` in ``slot`` (replacing whatever was there) and wait until it
        is healthy; the cold start in seconds."""
        ...

    def state(self, slot: Slot) -> ServerState:
        """Whether the slot's server runs, and if not, why."""
        ...

    def remove(self, slot: Slot) -> None:
        """Stop and remove the slot's server; idempotent."""
