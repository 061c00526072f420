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
    #: Restarts by the engine, and when the current run began: either changing while a
    #: window is watched means the server restarted under it.
    restarts: int = 0
    started_at: str = ""


@dataclass(frozen=True)
class RoutedState:
    """A slot as the router's own health check sees it."""

    up: bool
    #: Whether the slot is deliberately out of rotation (drained or in maintenance), as
    #: opposed to failing its health check.
    parked: bool
    detail: str  # e.g. "UP", "DOWN 1/2 (L7STS 503)", "MAINT"


class Router(Protocol):
    """Routes the model's endpoint to the two slots by weight (percent)."""

    @property
    def endpoint(self) -> str:
        """The model's URL, e.g. ``http://127.0.0.1:8090``."""
        ...

    @property
    def port(self) -> int | None:
        """The endpoint's port, once the router runs (kept for the deployment's life)."""
        ...

    def router_running(self) -> bool:
        """Whether the router itself is up."""
        ...

    def routed(self, slot: Slot) -> RoutedState | None:
        """How the router's health check sees ``slot`` (None: it has no such server)."""
        ...

    def wait_server_up(self, slot: Slot, deadline_s: float) -> None:
        """Until the router's health check sees ``slot`` up; RouterError after
        ``deadline_s``."""

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

    def probe_headers(self, slot: Slot, kind: str) -> dict[str, str]:
        """Headers that send one of Gantry's probes (``quality``, ``synthetic``) to ``slot``.
        Only Gantry can make them: a client's routing or probe headers are ignored."""
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

    def server_name(self, slot: Slot) -> str:
        """The slot's server as an operator finds it (a container or pod name)."""
        ...

    def logs(self, slot: Slot, tail: int = 40) -> str:
        """The last ``tail`` lines the slot's server logged ("" when there is none)."""
        ...


class Target(Router, ModelServers, Protocol):
    """A deploy target: one model's router and its servers."""

    model: str
    #: The deployment's name (its servers' and metrics' ``deployment`` label).
    name: str
