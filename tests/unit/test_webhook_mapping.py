"""Webhook payloads → release specs: the generic schema and GitHub's events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gantry.errors import ConfigError, WebhookForbiddenError, WebhookParameterError
from gantry.spec import load_spec
from gantry.webhook.config import GitHubRoute, WebhookConfig, load_webhook_config
from gantry.webhook.mapping import Ignored, Trigger, apply_overrides, map_delivery
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

DEMO = "examples/minilm-demo.yaml"
DEMO_SPEC = load_spec(REPO_ROOT / DEMO)


#: A receiver that lets generic deliveries carry inline specs and override these fields.
OPEN: dict[str, Any] = {
    "allow_inline_spec": True,
    "allow_overrides": True,
    "override_fields": (
        "source.revision",
        "sourse.revision",
        "name",
        "name.first",
        "scan.severity",
    ),
}


def _config(policy: dict[str, Any] | None = None, **routes: GitHubRoute) -> WebhookConfig:
    return WebhookConfig(
        spec_root=REPO_ROOT,
        github={k.replace("__", "/"): v for k, v in routes.items()},
        **(policy or {}),
    )


def _release(
    action: str = "published", repo: str = "acme/minilm", **release: Any
) -> dict[str, Any]:
    return {
        "action": action,
        "release": {"tag_name": "v2", "prerelease": False, "draft": False, **release},
        "repository": {"full_name": repo, "id": 1},
        "sender": {"login": "octocat"},
    }


def _workflow_run(
    action: str = "completed",
    conclusion: str | None = "success",
    name: str = "publish-model",
    branch: str = "main",
) -> dict[str, Any]:
    return {
        "action": action,
        "workflow_run": {
            "name": name,
            "path": f".github/workflows/{name}.yml",
            "head_branch": branch,
            "head_sha": "0123456789abcdef0123456789abcdef01234567",
            "conclusion": conclusion,
            "status": "completed",
        },
        "repository": {"full_name": "acme/ci"},
    }


def _trigger(outcome: Trigger | Ignored) -> Trigger:
    assert isinstance(outcome, Trigger), outcome
    return outcome


def _fields(exc: pytest.ExceptionInfo[WebhookParameterError]) -> list[str]:
    return [loc for loc, _ in exc.value.errors]


# --- generic payloads ---------------------------------------------------------------------


def test_generic_spec_path_with_revision_override() -> None:
    payload = {"spec_path": DEMO, "overrides": {"source.revision": "v2"}}
    t = _trigger(map_delivery(None, payload, _config(OPEN)))
    assert t.spec.source.revision == "v2"
    assert t.spec.model_dump(exclude={"source"}) == DEMO_SPEC.model_dump(exclude={"source"})
    assert t.event == "generic" and DEMO in t.origin


def test_generic_inline_spec() -> None:
    inline = {"name": "tiny", "source": {"repo_id": "acme/tiny", "revision": "abc"}}
    t = _trigger(
        map_delivery(None, {"spec": inline, "overrides": {"scan.severity": "HIGH"}}, _config(OPEN))
    )
    assert (t.spec.name, t.spec.source.repo_id, t.spec.scan.severity) == (
        "tiny",
        "acme/tiny",
        "HIGH",
    )


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"overrides": {}}, "(top level)"),  # neither spec_path nor spec
        ({"spec_path": DEMO, "spec": {"name": "x"}}, "(top level)"),  # both
        ({"spec_path": DEMO, "extra": 1}, "extra"),
        ({"spec_path": DEMO, "overrides": {"source.revision": ""}}, "spec.source.revision"),
        ({"spec_path": DEMO, "overrides": {"sourse.revision": "v2"}}, "spec.sourse"),
        ({"spec_path": DEMO, "overrides": {"name": "Not A Name"}}, "spec.name"),
        ({"spec_path": DEMO, "overrides": {"scan.severity": "SEVERE"}}, "spec.scan.severity"),
        ({"spec": {"name": "x"}}, "spec.source"),
        ({"spec_path": "../../etc/passwd"}, "spec_path"),
        ({"spec_path": "/etc/passwd"}, "spec_path"),
        ({"spec_path": "examples/no-such-spec.yaml"}, "spec_path"),
        ({"spec_path": DEMO, "overrides": {"name.first": "x"}}, "overrides.name.first"),
    ],
)
def test_generic_invalid_parameters_name_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(WebhookParameterError) as exc:
        map_delivery(None, payload, _config(OPEN))
    assert field in _fields(exc), exc.value.errors
    assert exc.value.status == 422


@pytest.mark.parametrize(
    ("payload", "policy", "fields"),
    [
        # Off by default: inline specs and overrides.
        ({"spec": {"name": "x", "source": {"repo_id": "a/b"}}}, {}, ["spec"]),
        (
            {"spec_path": DEMO, "overrides": {"source.revision": "v2"}},
            {},
            ["overrides.source.revision"],
        ),
        # Allowed, but only for the listed fields.
        (
            {"spec_path": DEMO, "overrides": {"evaluate.threshold": 0.1}},
            {"allow_overrides": True},
            ["overrides.evaluate.threshold"],
        ),
        # Listed, but a change that weakens a gate or redirects a credential or host path.
        *(
            (
                {"spec_path": DEMO, "overrides": {field: value}},
                {"allow_overrides": True, "override_fields": (field,)},
                [f"spec.{field.split('.')[0] if field.startswith('sign') else field}"],
            )
            for field, value in [
                ("scan.ignore_unfixed", True),
                (
                    "scan.allowlist",
                    [{"id": "CVE-2024-1", "expires": "2099-01-01", "reason": "accepted"}],
                ),
                ("evaluate.dataset", None),
                ("evaluate.threshold", 0.1),
                ("evaluate.tolerance", 0.5),
                ("canary.max_error_rate", 0.5),
                ("canary.steps", [50, 100]),
                ("sign.key", "/root/.ssh/id_ed25519"),
                ("runtime.dockerfile_dir", "/etc"),
                ("source.endpoint", "https://hub.attacker.example"),
                ("mlflow.tracking_uri", "https://mlflow.attacker.example"),
            ]
        ),
        (
            {"spec": {"name": "x", "source": {"repo_id": "a/b"}, "scan": {"allow_offline": True}}},
            {"allow_inline_spec": True},
            ["spec.scan.allow_offline"],
        ),
    ],
)
def test_a_delivery_cannot_weaken_a_gate_or_redirect_a_credential(
    payload: dict[str, Any], policy: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(WebhookForbiddenError) as exc:
        map_delivery(None, payload, _config(policy))
    assert exc.value.status == 403 and list(exc.value.fields) == fields, exc.value.message


def test_trusted_fields_and_stricter_changes_pass() -> None:
    stricter = {"spec_path": DEMO, "overrides": {"evaluate.threshold": 0.95}}
    policy = {"allow_overrides": True, "override_fields": ("evaluate.threshold",)}
    assert _trigger(map_delivery(None, stricter, _config(policy))).spec.evaluate.threshold == 0.95
    weaker = {"spec_path": DEMO, "overrides": {"evaluate.threshold": 0.1}}
    trusted = {**policy, "trusted_fields": ("evaluate.threshold",)}
    assert _trigger(map_delivery(None, weaker, _config(trusted))).spec.evaluate.threshold == 0.1
    # The GitHub route's own revision override is the config's, not the sender's choice.
    route = GitHubRoute(spec=DEMO, tag_as_revision=True)
    t = _trigger(map_delivery("release", _release(id=9), _config(acme__minilm=route)))
    assert t.spec.source.revision == "v2" and t.identity == "github:acme/minilm:release:9:published"


def test_payload_must_be_an_object() -> None:
    with pytest.raises(WebhookParameterError, match="JSON object"):
        map_delivery(None, [DEMO], _config())


def test_apply_overrides_creates_mappings_and_leaves_input_alone() -> None:
    data = {"name": "m", "source": {"repo_id": "a/b"}}
    out = apply_overrides(data, {"source.revision": "v3", "evaluate.threshold": 0.9})
    assert out == {
        "name": "m",
        "source": {"repo_id": "a/b", "revision": "v3"},
        "evaluate": {"threshold": 0.9},
    }
    assert data == {"name": "m", "source": {"repo_id": "a/b"}}


# --- GitHub release -----------------------------------------------------------------------


def test_release_published_uses_the_mapped_spec() -> None:
    t = _trigger(map_delivery("release", _release(), _config(acme__minilm=GitHubRoute(spec=DEMO))))
    assert t.spec == DEMO_SPEC
    assert t.event == "release" and "acme/minilm@v2" in t.origin


def test_release_tag_as_revision_and_case_insensitive_repository() -> None:
    config = _config(None, Acme__MiniLM=GitHubRoute(spec=DEMO, tag_as_revision=True))
    t = _trigger(map_delivery("release", _release(repo="acme/minilm", tag_name="v9"), config))
    assert t.spec.source.revision == "v9"


@pytest.mark.parametrize(
    ("payload", "route", "reason"),
    [
        (_release(action="created"), GitHubRoute(spec=DEMO), "only `published`"),
        (_release(repo="acme/other"), GitHubRoute(spec=DEMO), "not mapped"),
        (_release(prerelease=True), GitHubRoute(spec=DEMO), "prerelease"),
        (_release(draft=True), GitHubRoute(spec=DEMO, prereleases=True), "draft"),
        (_release(), GitHubRoute(spec=DEMO, events=("workflow_run",)), "not mapped"),
    ],
)
def test_release_events_that_start_nothing(
    payload: dict[str, Any], route: GitHubRoute, reason: str
) -> None:
    outcome = map_delivery("release", payload, _config(acme__minilm=route))
    assert isinstance(outcome, Ignored) and reason in outcome.reason


def test_prerelease_when_asked_for() -> None:
    config = _config(acme__minilm=GitHubRoute(spec=DEMO, prereleases=True))
    assert isinstance(map_delivery("release", _release(prerelease=True), config), Trigger)


def test_release_payload_missing_fields_names_them() -> None:
    payload = _release()
    del payload["release"]["tag_name"]
    with pytest.raises(WebhookParameterError) as exc:
        map_delivery("release", payload, _config(acme__minilm=GitHubRoute(spec=DEMO)))
    assert _fields(exc) == ["release.tag_name"]


def test_tag_that_is_no_revision_names_the_spec_field() -> None:
    config = _config(acme__minilm=GitHubRoute(spec=DEMO, tag_as_revision=True))
    with pytest.raises(WebhookParameterError) as exc:
        map_delivery("release", _release(tag_name="v" * 300), config)
    assert _fields(exc) == ["spec.source.revision"]


# --- GitHub workflow_run ------------------------------------------------------------------


def test_successful_workflow_run_releases() -> None:
    config = _config(
        acme__ci=GitHubRoute(spec=DEMO, workflows=("publish-model",), branches=("main",))
    )
    t = _trigger(map_delivery("workflow_run", _workflow_run(), config))
    assert t.spec == DEMO_SPEC and t.event == "workflow_run" and "0123456789ab" in t.origin


def test_workflow_matched_by_path() -> None:
    config = _config(
        acme__ci=GitHubRoute(spec=DEMO, workflows=(".github/workflows/publish-model.yml",))
    )
    assert isinstance(map_delivery("workflow_run", _workflow_run(), config), Trigger)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_workflow_run(action="requested", conclusion=None), "only `completed`"),
        (_workflow_run(action="in_progress", conclusion=None), "only `completed`"),
        (_workflow_run(conclusion="failure"), "concluded 'failure'"),
        (_workflow_run(conclusion="cancelled"), "concluded 'cancelled'"),
        (_workflow_run(name="lint"), "not one that releases"),
        (_workflow_run(branch="feature"), "not one that releases"),
    ],
)
def test_workflow_runs_that_start_nothing(payload: dict[str, Any], reason: str) -> None:
    config = _config(
        acme__ci=GitHubRoute(spec=DEMO, workflows=("publish-model",), branches=("main",))
    )
    outcome = map_delivery("workflow_run", payload, config)
    assert isinstance(outcome, Ignored) and reason in outcome.reason


@pytest.mark.parametrize("event", ["push", "pull_request", "check_suite", "ping"])
def test_other_events_are_ignored(event: str) -> None:
    outcome = map_delivery(event, {"zen": "Keep it logically awesome."}, _config())
    assert isinstance(outcome, Ignored)


# --- the receiver's config ------------------------------------------------------------------


def test_config_file_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "webhook.yaml"
    path.write_text(
        f"spec_root: {REPO_ROOT}\nmax_body_bytes: 2048\n"
        f"github:\n  acme/minilm:\n    spec: {DEMO}\n    events: [release]\n"
    )
    config = load_webhook_config(path)
    assert config.max_body_bytes == 2048 and config.route("ACME/minilm") is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"spec_root: {REPO_ROOT}\ngithub:\n  acme/minilm:\n    spec: examples/nope.yaml\n",
            "github.acme/minilm.spec",
        ),
        (
            f"spec_root: {REPO_ROOT}\ngithub:\n  acme/minilm:\n    spec: ../outside.yaml\n",
            "spec root",
        ),
        ("secret: plaintext-in-a-file\n", "secret"),
        ("github:\n  not-a-repo:\n    spec: x.yaml\n", "owner/name"),
        ("max_body_bytes: 0\n", "max_body_bytes"),
    ],
)
def test_config_errors_stop_the_receiver(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "webhook.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="invalid webhook config|webhook config") as exc:
        load_webhook_config(path)
    assert message in str(exc.value)
