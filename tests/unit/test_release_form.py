"""The `release` deployment's run form: the parameter schema Prefect generates from the
flow, prefect.yaml's defaults, and what Prefect's server-side validation accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gantry.adapters.prefect_api import load_project
from gantry.spec import ReleaseSpec, load_spec
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    from prefect.utilities.callables import parameter_schema

    from flows.release import release

    return parameter_schema(release).model_dump_for_openapi()


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}.{prop}", body)
        for name, definition in schema["definitions"].items()
        for prop, body in definition.get("properties", {}).items()
    ]


def test_the_spec_parameter_is_described(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert spec["$ref"] == "#/definitions/ReleaseSpec"
    assert "spec YAML file" in spec["description"]
    assert schema["required"] == ["spec"]


def test_every_field_has_a_title_and_a_description(schema: dict[str, Any]) -> None:
    def title(p: dict[str, Any]) -> str | None:
        # pydantic drops a field's title when it equals its $ref target's; the UI uses that.
        ref = p.get("$ref", "").split("/")[-1]
        found = p.get("title") or schema["definitions"].get(ref, {}).get("title")
        return str(found) if found else None

    props = _properties(schema)
    assert len(props) > 50
    missing = [n for n, p in props if not title(p) or not p.get("description")]
    assert missing == []


def test_choices_are_dropdowns(schema: dict[str, Any]) -> None:
    defs = schema["definitions"]
    for enum_name in ("Protocol", "Severity", "Accelerator"):
        assert defs[enum_name]["enum"], enum_name
    assert defs["SignOptions"]["properties"]["method"]["enum"] == ["key", "kms", "keyless"]
    assert defs["RuntimeOptions"]["properties"]["protocol"]["$ref"] == "#/definitions/Protocol"


def test_optional_fields_show_their_default(schema: dict[str, Any]) -> None:
    """Scalars, choices and lists start filled in; nested sections and free-form mappings
    (e.g. runtime.env) start empty, and their empty value is their default."""
    required = {
        f"{name}.{p}" for name, d in schema["definitions"].items() for p in d.get("required", [])
    }
    sections = {
        n
        for n, p in _properties(schema)
        if p.get("type") == "object"
        or ("$ref" in p and "enum" not in schema["definitions"][p["$ref"].split("/")[-1]])
    }
    no_default = [
        n for n, p in _properties(schema) if n not in required | sections and "default" not in p
    ]
    assert no_default == []


def test_prefect_yaml_default_is_the_demo_spec() -> None:
    data = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (release,) = [d for d in data["deployments"] if d["name"] == "release"]
    assert ReleaseSpec.model_validate(release["parameters"]["spec"]) == load_spec(
        REPO_ROOT / "examples/minilm-demo.yaml"
    )


def test_prefect_yaml_registers_release_and_rollback_on_the_process_pool() -> None:
    project = load_project(REPO_ROOT / "prefect.yaml", {"GANTRY_PROJECT_DIR": "/srv/gantry"})
    by_name = {d.name: d for d in project.deployments}
    assert set(by_name) == {"release", "rollback", "reevaluate"}
    assert all(d.enforce_parameter_schema for d in by_name.values())
    assert {d.work_pool.name for d in by_name.values()} == {"gantry-process"}
    assert by_name["rollback"].entrypoint == "flows/rollback.py:rollback"
    assert by_name["rollback"].schedules == []  # started by hand
    assert project.pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/srv/gantry"}}
    ]


@pytest.mark.parametrize("example", sorted((REPO_ROOT / "examples").glob("*.yaml")), ids=str)
def test_what_the_webhook_sends_passes_prefects_schema_check(
    schema: dict[str, Any], example: Path
) -> None:
    """enforce_parameter_schema: the server validates run parameters with this function."""
    from prefect.utilities.schema_tools.validation import validate

    spec = load_spec(example)
    validate({"spec": spec.model_dump(mode="json")}, schema, raise_on_error=True)


def test_prefects_schema_check_refuses_a_bad_spec(schema: dict[str, Any]) -> None:
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    bad = load_spec(REPO_ROOT / "examples/minilm-demo.yaml").model_dump(mode="json")
    bad["scan"]["severity"] = "SEVERE"
    with pytest.raises(ValidationError, match="severity"):
        validate({"spec": bad}, schema, raise_on_error=True)
