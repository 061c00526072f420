"""Where Gantry keeps its state and finds its services.

Everything lives under one state dir (``GANTRY_STATE_DIR``, default ``./.gantry``). Each
embedded service can be replaced by configuration with a production one.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gantry.errors import ConfigError

_HOSTPORT_HINT = "use HOST:PORT, e.g. 127.0.0.1:5075"


def _hostport(value: str, var: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{var}={value!r} is not HOST:PORT", fix=_HOSTPORT_HINT)
    return value


def _url(value: str, var: str) -> str | None:
    """An http(s) base URL without a trailing slash, or None when unset."""
    value = value.strip().rstrip("/")
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise ConfigError(
            f"{var} is not an http(s) URL", fix=f"e.g. {var}=http://prometheus.internal:9090"
        )
    return value


Topology = Literal["single", "multi"]
_TOPOLOGIES: tuple[Topology, ...] = ("single", "multi")


def _topology(value: str) -> Topology:
    value = value.strip().lower() or "single"
    for known in _TOPOLOGIES:
        if value == known:
            return known
    raise ConfigError(
        f"GANTRY_TOPOLOGY={value!r} is not one of {', '.join(_TOPOLOGIES)}",
        fix="unset GANTRY_TOPOLOGY (one machine), or set GANTRY_TOPOLOGY=multi (the tracking "
        "store is an MLflow server on PostgreSQL that several hosts share)",
    )


def _token_hosts(value: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in value.split(";"))):
        name, sep, hosts = part.partition("=")
        listed = tuple(h.strip().lower() for h in hosts.split(",") if h.strip())
        if not sep or not name.strip() or not listed:
            raise ConfigError(
                f"GANTRY_TOKEN_HOSTS: {part!r} is not NAME=HOST[,HOST…]",
                fix="e.g. GANTRY_TOKEN_HOSTS='HF_TOKEN=hub.internal:8443;ORG_TOKEN=hub.org'",
            )
        out[name.strip()] = listed
    return out


class Settings(BaseModel):
    """Process-wide settings, read from the environment once."""

    model_config = ConfigDict(frozen=True)

    state_dir: Path = Field(description="Root of all local state (GANTRY_STATE_DIR).")
    registry: str = Field(
        description="OCI registry HOST:PORT images are pushed to (GANTRY_REGISTRY). "
        "The default is the embedded registry on 127.0.0.1."
    )
    registry_is_local: bool = Field(description="Whether Gantry runs the registry itself.")
    hub_addr: str = Field(description="HOST:PORT of the embedded Hub endpoint (GANTRY_HUB_ADDR).")
    prefect_port: int = Field(description="Port of the embedded Prefect server.")
    prefect_host: str = Field(
        default="127.0.0.1",
        description="Address the embedded Prefect server listens on (GANTRY_PREFECT_HOST); "
        "its clients on this host use 127.0.0.1.",
    )
    prometheus_addr: str = Field(
        default="127.0.0.1:5077",
        description="HOST:PORT the embedded Prometheus listens on (GANTRY_PROMETHEUS_ADDR).",
    )
    prometheus_external_url: str | None = Field(
        default=None,
        description="URL of a Prometheus Gantry uses instead of running its own "
        "(GANTRY_PROMETHEUS_URL); it must scrape Gantry's exporter and the file-SD targets "
        "under scrape_targets_dir itself.",
    )
    exporter_addr: str = Field(
        default="127.0.0.1:5078",
        description="HOST:PORT Gantry's own metrics exporter listens on (GANTRY_EXPORTER_ADDR).",
    )
    topology: Topology = Field(
        default="single",
        description="GANTRY_TOPOLOGY: `single` (one machine; MLflow on SQLite under the state "
        "dir) or `multi` (state other hosts must see lives in services: `gantry env up` runs an "
        "MLflow tracking server on PostgreSQL unless MLFLOW_TRACKING_URI names one).",
    )
    postgres_addr: str = Field(
        default="127.0.0.1:5079",
        description="HOST:PORT the embedded PostgreSQL listens on (GANTRY_POSTGRES_ADDR); "
        "multi topology only.",
    )
    mlflow_server_addr: str = Field(
        default="127.0.0.1:5080",
        description="HOST:PORT the embedded MLflow tracking server listens on "
        "(GANTRY_MLFLOW_ADDR); multi topology only.",
    )
    worker_port: int = Field(
        default=4277,
        description="Port of the local Prefect worker's health endpoint (GANTRY_WORKER_PORT).",
    )
    cache_dir: Path = Field(
        description="Downloads verified by content (wheels, base-image root filesystems, demo "
        "model wheels) (GANTRY_CACHE_DIR, default <state dir>/cache). Safe to share."
    )
    built_wheels_dir: Path = Field(
        description="Wheels compiled from source for runtime images (llama-cpp-python: ~5 "
        "minutes on 2 cores), keyed by sdist hash and build settings (GANTRY_BUILT_WHEELS_DIR, "
        "default ~/.cache/gantry/built-wheels, so fresh checkouts reuse them). Safe to share."
    )
    deployments_dir_override: Path | None = Field(
        default=None,
        description="Where the Docker deploy target keeps each model's deployment "
        "(GANTRY_DEPLOYMENTS_DIR, default <state dir>/deployments). Worker hosts that deploy "
        "through one engine share it, at the same path on each: the router mounts its "
        "configuration from there, so it is a directory of the engine's host.",
    )
    docker_timeout_s: float = Field(default=600, description="Docker API call timeout.")
    token_hosts: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Hub hosts (HOST[:PORT]) each token may be sent to, by the token's "
        "variable name or `secret:<block>` (GANTRY_TOKEN_HOSTS, `HF_TOKEN=hub.internal,"
        "hub2.internal;ORG_TOKEN=…`), besides huggingface.co and the host of $HF_ENDPOINT.",
    )

    @field_validator("state_dir", "cache_dir", "built_wheels_dir", "deployments_dir_override")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        registry = e.get("GANTRY_REGISTRY", "")
        state_dir = Path(e.get("GANTRY_STATE_DIR") or ".gantry")
        return cls(
            state_dir=state_dir,
            cache_dir=Path(e.get("GANTRY_CACHE_DIR") or state_dir / "cache"),
            built_wheels_dir=Path(
                e.get("GANTRY_BUILT_WHEELS_DIR")
                or Path(e.get("XDG_CACHE_HOME") or "~/.cache") / "gantry" / "built-wheels"
            ),
            registry=_hostport(registry, "GANTRY_REGISTRY")
            if registry
            else _hostport(
                e.get("GANTRY_LOCAL_REGISTRY_ADDR", "127.0.0.1:5075"), "GANTRY_LOCAL_REGISTRY_ADDR"
            ),
            registry_is_local=not registry,
            hub_addr=_hostport(e.get("GANTRY_HUB_ADDR", "127.0.0.1:5076"), "GANTRY_HUB_ADDR"),
            prefect_port=int(e.get("GANTRY_PREFECT_PORT", "4275")),
            prefect_host=e.get("GANTRY_PREFECT_HOST", "127.0.0.1"),
            prometheus_addr=_hostport(
                e.get("GANTRY_PROMETHEUS_ADDR", "127.0.0.1:5077"), "GANTRY_PROMETHEUS_ADDR"
            ),
            prometheus_external_url=_url(
                e.get("GANTRY_PROMETHEUS_URL", ""), "GANTRY_PROMETHEUS_URL"
            ),
            exporter_addr=_hostport(
                e.get("GANTRY_EXPORTER_ADDR", "127.0.0.1:5078"), "GANTRY_EXPORTER_ADDR"
            ),
            worker_port=int(e.get("GANTRY_WORKER_PORT", "4277")),
            topology=_topology(e.get("GANTRY_TOPOLOGY", "")),
            postgres_addr=_hostport(
                e.get("GANTRY_POSTGRES_ADDR", "127.0.0.1:5079"), "GANTRY_POSTGRES_ADDR"
            ),
            mlflow_server_addr=_hostport(
                e.get("GANTRY_MLFLOW_ADDR", "127.0.0.1:5080"), "GANTRY_MLFLOW_ADDR"
            ),
            token_hosts=_token_hosts(e.get("GANTRY_TOKEN_HOSTS", "")),
            deployments_dir_override=Path(e["GANTRY_DEPLOYMENTS_DIR"])
            if e.get("GANTRY_DEPLOYMENTS_DIR")
            else None,
        )

    # Sub-directories; created on first use by the code that writes them.
    @cached_property
    def releases_dir(self) -> Path:
        return self.state_dir / "releases"

    @cached_property
    def weights_dir(self) -> Path:
        return self.state_dir / "weights"

    @cached_property
    def wheelhouse_dir(self) -> Path:
        return self.cache_dir / "wheelhouse"

    @cached_property
    def base_images_dir(self) -> Path:
        return self.cache_dir / "base-images"

    @cached_property
    def demo_wheels_dir(self) -> Path:
        return self.cache_dir / "demo-wheels"

    @cached_property
    def services_dir(self) -> Path:
        return self.state_dir / "services"

    @cached_property
    def hub_dir(self) -> Path:
        return self.state_dir / "hub"

    @cached_property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @cached_property
    def build_dir(self) -> Path:
        return self.state_dir / "build"

    @cached_property
    def deployments_dir(self) -> Path:
        return self.deployments_dir_override or self.state_dir / "deployments"

    @property
    def deployments_shared(self) -> bool:
        """Whether the deployments are kept outside this state dir (GANTRY_DEPLOYMENTS_DIR),
        where other hosts deploying through the same engine share them."""
        return self.deployments_dir_override is not None

    @cached_property
    def webhook_dir(self) -> Path:
        return self.state_dir / "webhook"

    @cached_property
    def prometheus_dir(self) -> Path:
        """The embedded Prometheus's configuration and TSDB (``data/``)."""
        return self.state_dir / "prometheus"

    @cached_property
    def scrape_targets_dir(self) -> Path:
        """File service discovery: one JSON target-group file per deployment, written by the
        exporter, read by Prometheus (``file_sd_configs``)."""
        return self.prometheus_dir / "targets"

    @cached_property
    def postgres_dir(self) -> Path:
        """The embedded PostgreSQL's cluster (``data/``), socket dir and password file."""
        return self.state_dir / "postgres"

    @cached_property
    def mlflow_artifacts_dir(self) -> Path:
        """Where the embedded MLflow server keeps the artifacts it serves (multi topology)."""
        return self.state_dir / "mlflow" / "artifacts-server"

    @property
    def mlflow_server_url(self) -> str:
        return f"http://{self.mlflow_server_addr}"

    @property
    def default_tracking_uri(self) -> str:
        """The tracking store when neither MLFLOW_TRACKING_URI nor the spec names one:
        SQLite under the state dir (single), the embedded MLflow server (multi)."""
        if self.topology == "multi":
            return self.mlflow_server_url
        return f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def prometheus_is_local(self) -> bool:
        """Whether Gantry runs Prometheus itself (no GANTRY_PROMETHEUS_URL)."""
        return self.prometheus_external_url is None

    @property
    def prometheus_url(self) -> str:
        return self.prometheus_external_url or f"http://{self.prometheus_addr}"

    @property
    def hub_url(self) -> str:
        return f"http://{self.hub_addr}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"


def get_settings() -> Settings:
    """Settings from the current environment (cheap; call where needed)."""
    return Settings.from_env()
