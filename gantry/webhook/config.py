"""Configuration of the webhook receiver: a YAML file, the secret from env or Prefect.

Example (``webhook.yaml``)::

    deployment: release/release        # flow/deployment the deliveries start
    max_body_bytes: 1048576
    secret_block: gantry-webhook       # used when $GANTRY_WEBHOOK_SECRET is unset
    github:
      acme/minilm-model:               # repository full name → spec file
        spec: examples/minilm-demo.yaml
        events: [release]
        tag_as_revision: true          # release tag → source.revision
      acme/ci:
        spec: examples/minilm-demo-v2.yaml
        events: [workflow_run]
        workflows: [publish-model]     # only this workflow's successful runs
        branches: [main]
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import anyio
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gantry.errors import ConfigError, SpecError
from gantry.spec import load_spec

log = logging.getLogger(__name__)

DEFAULT_SECRET_ENV = "GANTRY_WEBHOOK_SECRET"  # noqa: S105  (a variable name, not a secret)
#: GitHub caps deliveries at 25 MB; release and workflow_run payloads are tens of KB.
DEFAULT_MAX_BODY = 1024 * 1024


class GitHubRoute(BaseModel):
    """What one GitHub repository's events release."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: str = Field(description="Spec file, relative to the spec root.", min_length=1)
    events: tuple[Literal["release", "workflow_run"], ...] = Field(
        default=("release", "workflow_run"),
        min_length=1,
        description="Which events of the repository start a release.",
    )
    tag_as_revision: bool = Field(
        default=False,
        description="`release` events: use the release's tag as source.revision (for a Hub "
        "repository tagged like the GitHub one). Otherwise the spec's revision is used.",
    )
    prereleases: bool = Field(
        default=False, description="`release` events: also release published prereleases."
    )
    workflows: tuple[str, ...] = Field(
        default=(),
        description="`workflow_run` events: only runs of these workflows (name, or path "
        "such as .github/workflows/publish.yml). Empty: any workflow.",
    )
    branches: tuple[str, ...] = Field(
        default=(),
        description="`workflow_run` events: only runs on these branches. Empty: any branch.",
    )


class WebhookConfig(BaseModel):
    """The receiver's settings; every field has a working default but ``github``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment: str = Field(
        default="release/release",
        pattern=r"^[^/\s]+/[^/\s]+$",
        description="`flow/deployment` that deliveries start.",
    )
    spec_root: Path = Field(
        default_factory=lambda: Path(os.environ.get("GANTRY_PROJECT_DIR") or Path.cwd()),
        description="Spec paths (generic payloads and the GitHub mapping) resolve under "
        "this directory and may not leave it. Default: $GANTRY_PROJECT_DIR, else the "
        "working directory.",
    )
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY, gt=0, le=25 * 1024 * 1024)
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds a delivery's body may take to arrive; slower ones get 408.",
    )
    secret_env: str = Field(default=DEFAULT_SECRET_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_block: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+$",
        description="Prefect Secret block holding the secret, used when the variable is unset.",
    )
    prefect_timeout_s: float = Field(default=30, gt=0, le=300)
    github: dict[str, GitHubRoute] = Field(
        default_factory=dict, description="Repository full name (`owner/name`) → route."
    )
    allow_inline_spec: bool = Field(
        default=False,
        description="Let generic deliveries carry a whole spec (`spec`) instead of naming a "
        "spec file under the spec root.",
    )
    allow_overrides: bool = Field(
        default=False, description="Let generic deliveries override fields of their spec."
    )
    override_fields: tuple[str, ...] = Field(
        default=("source.revision",),
        description="The dotted fields an override may set (with allow_overrides).",
    )
    trusted_fields: tuple[str, ...] = Field(
        default=(),
        description="Fields a delivery may change even though the change weakens a gate or "
        "names a host path or credential (e.g. `evaluate.threshold`); none by default.",
    )
    require_timestamp: bool = Field(
        default=False,
        description="Refuse generic deliveries not signed with a timestamp "
        "(`X-Gantry-Signature: t=<unix time>,v1=<hex>`).",
    )
    signature_tolerance_s: float = Field(
        default=300,
        gt=0,
        le=86400,
        description="How old (or how far ahead) a timestamped signature may be.",
    )

    @field_validator("spec_root")
    @classmethod
    def _root(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("github")
    @classmethod
    def _repos(cls, v: dict[str, GitHubRoute]) -> dict[str, GitHubRoute]:
        # GitHub repository names are case-insensitive; match them that way.
        out: dict[str, GitHubRoute] = {}
        for name, route in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", name):
                raise ValueError(f"{name!r} is not a repository full name (`owner/name`)")
            out[name.lower()] = route
        return out

    def route(self, repository: str) -> GitHubRoute | None:
        return self.github.get(repository.lower())


def load_webhook_config(path: Path | None) -> WebhookConfig:
    """Read the YAML file at ``path`` (None: all defaults) and check its spec files."""
    data: object = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(
                f"webhook config {path} does not exist",
                fix="pass --config FILE or set GANTRY_WEBHOOK_CONFIG to an existing file",
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"webhook config {path} is not valid YAML: {exc}") from None
    try:
        config = WebhookConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(
            f"invalid webhook config {path}: {problems}",
            fix="correct the fields named above (see `gantry webhook serve --help`)",
        ) from None
    for repo, route in config.github.items():
        # A typo in the mapping should stop the receiver now, not fail the first delivery.
        try:
            load_spec(resolve_spec_path(config.spec_root, route.spec))
        except (SpecError, ValueError) as exc:
            raise ConfigError(
                f"webhook config {path}: github.{repo}.spec: {exc}",
                fix="point it at a valid spec file under the spec root",
            ) from None
    return config


def resolve_spec_path(root: Path, relative: str) -> Path:
    """``root / relative``, refused (ValueError) when it would leave ``root``."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"spec path {relative!r} must be relative to the spec root, without ..")
    resolved = (root / candidate).resolve()
    # Symlinks could still point outside; check the resolved path too.
    if not resolved.is_relative_to(root):
        raise ValueError(f"spec path {relative!r} leaves the spec root")
    return resolved


def load_secret(config: WebhookConfig, env: Mapping[str, str] | None = None) -> bytes:
    """The shared secret: ``$secret_env``, else the Prefect Secret block ``secret_block``."""
    e = os.environ if env is None else env
    if value := e.get(config.secret_env, ""):
        log.info("webhook secret from $%s", config.secret_env)
        return value.encode()
    if config.secret_block:
        from gantry.adapters.prefect_api import aload_secret

        secret = anyio.run(aload_secret, config.secret_block, config.prefect_timeout_s)
        log.info("webhook secret from Prefect Secret block %s", config.secret_block)
        return secret.encode()
    raise ConfigError(
        "no webhook secret is configured: deliveries cannot be verified",
        fix=f"export {config.secret_env}=<secret> (e.g. from `python -c 'import secrets; "
        "print(secrets.token_hex(32))'`), or set secret_block to a Prefect Secret block",
    )
