"""From a delivery's JSON payload to the ReleaseSpec of a `release` run.

Three payload kinds:

- generic (no ``X-GitHub-Event``): :class:`GenericTrigger`, a spec file under the spec
  root or an inline spec, plus dotted overrides::

      {"spec_path": "examples/minilm-demo.yaml", "overrides": {"source.revision": "v2"}}

- GitHub ``release`` with action ``published``: the repository's configured spec; with
  ``tag_as_revision`` the release tag becomes ``source.revision``.
- GitHub ``workflow_run`` with action ``completed`` and conclusion ``success``: the
  repository's configured spec, optionally only for some workflows and branches.

Anything else maps to :class:`Ignored` (answered 202, logged, no run). A payload that
cannot become a valid spec raises :class:`WebhookParameterError` naming each field.

A sender holds a shared secret, not the keys to the platform: inline specs and overrides
are off unless the webhook config allows them (and overrides then only for its
``override_fields``), and no delivery may weaken a gate or point a credential or a host
path elsewhere (:func:`weakened`) unless the config trusts that field
(:class:`~gantry.errors.WebhookForbiddenError`, 403).
"""

from __future__ import annotations

import copy
import re
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gantry.errors import ConfigError, WebhookForbiddenError, WebhookParameterError
from gantry.spec import ReleaseSpec, Severity
from gantry.webhook.config import WebhookConfig, resolve_spec_path

_M = TypeVar("_M", bound=BaseModel)
_OVERRIDE_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


class GenericTrigger(BaseModel):
    """The generic payload: which spec to release, and what to change in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec_path: str | None = Field(
        default=None,
        description="Spec file relative to the receiver's spec root, e.g. "
        "`examples/minilm-demo.yaml`.",
        min_length=1,
    )
    spec: dict[str, Any] | None = Field(
        default=None, description="The whole spec inline (the same fields as the YAML file)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted spec field → value, applied before validation, e.g. "
        '`{"source.revision": "<commit sha>"}`.',
    )

    @model_validator(mode="after")
    def _one_source(self) -> GenericTrigger:
        if (self.spec_path is None) == (self.spec is None):
            raise ValueError("give exactly one of spec_path and spec")
        for key in self.overrides:
            if not _OVERRIDE_KEY.match(key):
                raise ValueError(f"override key {key!r} must be a dotted field path")
        return self


class _GitHubModel(BaseModel):
    # GitHub payloads carry far more than Gantry reads; the rest is ignored on purpose.
    model_config = ConfigDict(frozen=True, extra="ignore")


class GitHubRepository(_GitHubModel):
    full_name: str


class GitHubRelease(_GitHubModel):
    id: int | None = None
    tag_name: str = Field(min_length=1)
    prerelease: bool = False
    draft: bool = False


class ReleaseEvent(_GitHubModel):
    """GitHub's ``release`` event (the fields Gantry uses)."""

    action: str
    release: GitHubRelease
    repository: GitHubRepository


class WorkflowRun(_GitHubModel):
    id: int | None = None
    run_attempt: int = 1
    name: str | None = None
    path: str | None = None
    head_branch: str | None = None
    head_sha: str
    conclusion: str | None = None


class WorkflowRunEvent(_GitHubModel):
    """GitHub's ``workflow_run`` event (the fields Gantry uses)."""

    action: str
    workflow_run: WorkflowRun
    repository: GitHubRepository


class Trigger(BaseModel):
    """A delivery that starts a release."""

    model_config = ConfigDict(frozen=True)

    spec: ReleaseSpec
    origin: str = Field(description="What caused it, for logs and run tags.")
    event: str
    identity: str | None = Field(
        default=None,
        description="What the signed payload itself says it is (GitHub's release id and "
        "action, workflow run id and attempt): a resend under a new delivery id is the "
        "same trigger.",
    )


class Ignored(BaseModel):
    """A valid delivery that starts nothing, and why."""

    model_config = ConfigDict(frozen=True)

    reason: str


def map_delivery(event: str | None, payload: Any, config: WebhookConfig) -> Trigger | Ignored:
    """Map one verified delivery; ``event`` is ``X-GitHub-Event`` (None: generic)."""
    if event is None:
        return _generic(payload, config)
    if event == "ping":
        return Ignored(reason="ping: the webhook reaches Gantry and its signature verifies")
    if event == "release":
        return _github_release(payload, config)
    if event == "workflow_run":
        return _github_workflow_run(payload, config)
    return Ignored(reason=f"GitHub event {event!r} is not one Gantry releases on")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key set, creating missing mappings.

    >>> apply_overrides({"source": {"revision": "v1"}}, {"source.revision": "v2"})
    {'source': {'revision': 'v2'}}
    """
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise WebhookParameterError(
                    f"override {key!r} goes through {'.'.join(parents[: i + 1])}, which is "
                    "not a mapping",
                    errors=[(f"overrides.{key}", "the parent field is not a mapping")],
                )
            node = child
        node[leaf] = value
    return out


def _generic(payload: Any, config: WebhookConfig) -> Trigger:
    trigger = _validate(GenericTrigger, payload, prefix="")
    if trigger.overrides:
        if not config.allow_overrides:
            raise WebhookForbiddenError(
                "this receiver takes no overrides",
                fields=[f"overrides.{k}" for k in trigger.overrides],
                fix="send the spec_path alone, or set allow_overrides in the webhook config",
            )
        unlisted = sorted(k for k in trigger.overrides if k not in config.override_fields)
        if unlisted:
            raise WebhookForbiddenError(
                f"overrides of {', '.join(unlisted)} are not allowed (allowed: "
                f"{', '.join(config.override_fields) or 'none'})",
                fields=[f"overrides.{k}" for k in unlisted],
                fix="add the field to override_fields in the webhook config if deliveries "
                "may set it",
            )
    if trigger.spec_path is not None:
        data = _read_spec(config, trigger.spec_path, loc="spec_path")
        origin = f"generic delivery, spec {trigger.spec_path}"
        base = _validate(ReleaseSpec, data, prefix="spec.")
    else:
        if not config.allow_inline_spec:
            raise WebhookForbiddenError(
                "this receiver takes no inline specs",
                fields=["spec"],
                fix="name a spec file under the spec root (spec_path), or set "
                "allow_inline_spec in the webhook config",
            )
        data = dict(trigger.spec or {})
        origin = "generic delivery, inline spec"
        base = None
    spec = _validate(ReleaseSpec, apply_overrides(data, trigger.overrides), prefix="spec.")
    _refuse_weakening(spec, base or _defaults_for(spec), config)
    return Trigger(spec=spec, origin=origin, event="generic")


#: Fields whose change from a delivery weakens a gate, or sends a credential, a signature
#: or the record somewhere else, or names a host path: field -> the direction that weakens
#: ("any": every change).
_GUARDED: dict[str, str] = {
    "source.endpoint": "any",
    "source.token_env": "any",
    "source.token_secret": "any",
    "runtime.dockerfile_dir": "any",
    "build.repository": "any",
    "scan.severity": "up",
    "scan.ignore_unfixed": "on",
    "scan.allowlist": "any",
    "scan.allow_offline": "on",
    "scan.db_repository": "any",
    "sign": "any",
    "smoke.chat_prompt": "any",
    "smoke.chat_expect": "any",
    "evaluate.dataset": "any",
    "evaluate.metric": "any",
    "evaluate.threshold": "down",
    "evaluate.tolerance": "up",
    "mlflow.tracking_uri": "any",
    "mlflow.model_name": "any",
    "canary.steps": "any",
    "canary.window_s": "down",
    "canary.min_requests": "down",
    "canary.max_error_rate": "up",
    "canary.max_latency_ratio": "up",
    "canary.latency_slack_ms": "up",
    "canary.quality_probes": "down",
    "canary.quality_tolerance": "up",
    "canary.manual_approval": "off",
}
_SEVERITY_RANK = {s.value: i for i, s in enumerate(Severity)}


def weakened(spec: ReleaseSpec, base: ReleaseSpec) -> list[tuple[str, str]]:
    """``(field, why)`` for each guarded field ``spec`` changes from ``base`` the weak way."""
    new, old = _flat(spec.model_dump(mode="json")), _flat(base.model_dump(mode="json"))
    out: list[tuple[str, str]] = []
    for field, direction in _GUARDED.items():
        keys = sorted(k for k in {*new, *old} if k == field or k.startswith(f"{field}."))
        changed = [k for k in keys if new.get(k) != old.get(k)]
        if not changed:
            continue
        a, b = old.get(field), new.get(field)
        if field == "scan.severity" and isinstance(a, str) and isinstance(b, str):
            a, b = _SEVERITY_RANK.get(a, 0), _SEVERITY_RANK.get(b, 0)
        weak = {
            "any": True,
            "on": b is True,
            "off": b is False,
            "up": isinstance(a, int | float) and isinstance(b, int | float) and b > a,
            "down": isinstance(a, int | float) and isinstance(b, int | float) and b < a,
        }[direction]
        if weak:
            out.append(
                (field, "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed[:3]))
            )
    return out


def _refuse_weakening(spec: ReleaseSpec, base: ReleaseSpec, config: WebhookConfig) -> None:
    found = [(f, why) for f, why in weakened(spec, base) if f not in config.trusted_fields]
    if found:
        raise WebhookForbiddenError(
            "a delivery may not weaken a gate or redirect a credential, signature, record or "
            "host path: " + "; ".join(why for _, why in found),
            fields=[f"spec.{f}" for f, _ in found],
            fix="change the spec file under the spec root instead, or list the field in "
            "trusted_fields of the webhook config",
        )


def _defaults_for(spec: ReleaseSpec) -> ReleaseSpec:
    """What an inline spec is held against: the defaults, for its model and source."""
    return ReleaseSpec.model_validate(
        {"name": spec.name, "source": {"repo_id": spec.source.repo_id, "revision": "main"}}
    )


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _github_release(payload: Any, config: WebhookConfig) -> Trigger | Ignored:
    ev = _validate(ReleaseEvent, payload, prefix="")
    repo = ev.repository.full_name
    if ev.action != "published":
        return Ignored(reason=f"release action {ev.action!r} (only `published` releases)")
    route = config.route(repo)
    if route is None or "release" not in route.events:
        return Ignored(reason=f"release events of {repo} are not mapped to a spec")
    if ev.release.draft or (ev.release.prerelease and not route.prereleases):
        kind = "draft" if ev.release.draft else "prerelease"
        return Ignored(reason=f"{repo} {ev.release.tag_name} is a {kind}")
    data = _read_spec(config, route.spec, loc=None)
    overrides = {"source.revision": ev.release.tag_name} if route.tag_as_revision else {}
    spec = _validate(ReleaseSpec, apply_overrides(data, overrides), prefix="spec.")
    identity = (
        None
        if ev.release.id is None
        else f"github:{repo.lower()}:release:{ev.release.id}:{ev.action}"
    )
    return Trigger(
        spec=spec,
        origin=f"GitHub release {repo}@{ev.release.tag_name}",
        event="release",
        identity=identity,
    )


def _github_workflow_run(payload: Any, config: WebhookConfig) -> Trigger | Ignored:
    ev = _validate(WorkflowRunEvent, payload, prefix="")
    repo, run = ev.repository.full_name, ev.workflow_run
    if ev.action != "completed":
        return Ignored(reason=f"workflow_run action {ev.action!r} (only `completed` runs)")
    if run.conclusion != "success":
        return Ignored(reason=f"workflow run concluded {run.conclusion!r}, not `success`")
    route = config.route(repo)
    if route is None or "workflow_run" not in route.events:
        return Ignored(reason=f"workflow_run events of {repo} are not mapped to a spec")
    if route.workflows and not {run.name, run.path} & set(route.workflows):
        return Ignored(reason=f"workflow {run.name or run.path!r} is not one that releases")
    if route.branches and run.head_branch not in route.branches:
        return Ignored(reason=f"branch {run.head_branch!r} is not one that releases")
    spec = _validate(ReleaseSpec, _read_spec(config, route.spec, loc=None), prefix="spec.")
    return Trigger(
        spec=spec,
        origin=f"GitHub workflow run {repo} {run.name or run.path} @{run.head_sha[:12]}",
        event="workflow_run",
        identity=None
        if run.id is None
        else f"github:{repo.lower()}:workflow_run:{run.id}:{run.run_attempt}",
    )


def _read_spec(config: WebhookConfig, relative: str, *, loc: str | None) -> dict[str, Any]:
    """The spec file's mapping. ``loc`` names the payload field that chose the file; None
    means the receiver's own configuration did, so a problem is the operator's."""
    try:
        path = resolve_spec_path(config.spec_root, relative)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"spec file {relative} does not hold a mapping")
    except (ValueError, OSError, yaml.YAMLError) as exc:
        reason = "no such spec file" if isinstance(exc, FileNotFoundError) else str(exc)
        if loc is None:
            raise ConfigError(
                f"the webhook config maps to spec {relative}, which cannot be read: {reason}",
                fix="correct the github mapping of the webhook config",
            ) from None
        raise WebhookParameterError(
            f"{loc}: {reason}", errors=[(loc, f"{reason} (under the spec root)")]
        ) from None
    return data


def _validate(model: type[_M], data: Any, *, prefix: str) -> _M:
    if not isinstance(data, dict):
        raise WebhookParameterError(
            "the payload must be a JSON object", errors=[("(top level)", "not an object")]
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            (
                prefix + (".".join(str(p) for p in e["loc"]) or "(top level)"),
                "unknown field" if e["type"] == "extra_forbidden" else e["msg"],
            )
            for e in exc.errors()
        ]
        raise WebhookParameterError(
            "invalid release parameters: " + "; ".join(f"{loc}: {msg}" for loc, msg in errors),
            errors=errors,
        ) from None
