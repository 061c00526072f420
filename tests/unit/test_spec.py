from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gantry.errors import SpecError
from gantry.spec import ReleaseSpec, load_spec, parse_spec

pytestmark = pytest.mark.unit

SOURCE: dict[str, Any] = {"repo_id": "gantry-demo/all-MiniLM-L6-v2", "revision": "v1"}
GOOD: dict[str, Any] = {"name": "minilm", "source": SOURCE}


def test_defaults_and_release_id_is_stable() -> None:
    a, b = parse_spec(GOOD), parse_spec(dict(GOOD))
    assert a.release_id == b.release_id and a.release_id.startswith("minilm-")
    assert a.image_repository == "gantry/minilm"
    assert a.source.allow_patterns  # a default selection exists
    changed = parse_spec({**GOOD, "source": {**SOURCE, "revision": "v2"}})
    assert changed.release_id != a.release_id


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**GOOD, "colour": "red"}, "colour: unknown field"),
        ({**GOOD, "source": {**SOURCE, "repo": "x"}}, "source.repo: unknown field"),
        ({**GOOD, "name": "Mini LM"}, "name:"),
        ({**GOOD, "source": {"repo_id": "no-slash"}}, "source.repo_id:"),
        ({**GOOD, "source": {"repo_id": "a/../b"}}, "source.repo_id:"),
        (
            {**GOOD, "source": {**SOURCE, "allow_patterns": ["../x"]}},
            "source.allow_patterns:",
        ),
        ({**GOOD, "source": {**SOURCE, "endpoint": "ftp://x"}}, "source.endpoint:"),
        ({**GOOD, "retries": {"attempts": 99}}, "retries.attempts:"),
        # Secrets have no place in a spec: it is stored in clear (records, MLflow, Prefect).
        ({**GOOD, "runtime": {"env": {"HF_TOKEN": "hf_x"}}}, "runtime.env: Value error, HF_TOKEN"),
        ({**GOOD, "runtime": {"env": {"db_password": "x"}}}, "runtime.env: Value error, db_pass"),
        (
            {**GOOD, "source": {**SOURCE, "endpoint": "https://hf_tok@hub.example"}},
            "source.endpoint: Value error, holds credentials",
        ),
        (
            {**GOOD, "mlflow": {"tracking_uri": "https://u:p@mlflow.example"}},
            "MLFLOW_TRACKING_PASSWORD",
        ),
        ({**GOOD, "sign": {"method": "kms"}}, "sign: Value error, method kms needs kms_uri"),
        ({**GOOD, "sign": {"method": "keyless"}}, "needs certificate_identity"),
        ({"source": GOOD["source"]}, "name: Field required"),
    ],
)
def test_bad_fields_are_named(data: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert field in str(e.value)
    assert "fix:" in str(e.value)


def test_spec_is_frozen() -> None:
    spec = parse_spec(GOOD)
    with pytest.raises(ValueError):
        spec.name = "other"  # type: ignore[misc]


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(top)


def test_examples_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    specs = sorted(root.glob("*.yaml"))
    assert {p.name for p in specs} >= {
        "minilm-demo.yaml",
        "minilm-demo-v2.yaml",
        "minilm-degraded.yaml",
    }
    for p in specs:
        assert isinstance(load_spec(p), ReleaseSpec)


def test_every_field_is_described() -> None:
    """The spec is the Prefect UI form: every field needs a description."""
    schema = ReleaseSpec.model_json_schema()
    missing = []
    for model_name, model in [("ReleaseSpec", schema), *schema.get("$defs", {}).items()]:
        for field, prop in model.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{model_name}.{field}")
    assert not missing


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(GOOD)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert spec.source.resolved_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert spec.source.resolved_endpoint() == "http://127.0.0.1:9"
    explicit = parse_spec({**GOOD, "source": {**SOURCE, "endpoint": "http://h:1/"}})
    assert explicit.source.resolved_endpoint() == "http://h:1"


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["--gpu-memory-utilization", "0.90"], True),
        (["--gpu-memory-utilization=0.85"], True),
        (["--gpu-memory-utilization", "0.95"], False),
        (["--gpu-memory-utilization=1"], False),
        (["--gpu-memory-utilization", "lots"], False),
    ],
)
def test_gpu_memory_utilization_is_capped(args: list[str], ok: bool) -> None:
    data = {**GOOD, "runtime": {"args": args}}
    if ok:
        parse_spec(data)
    else:
        with pytest.raises(SpecError, match=r"runtime\.args"):
            parse_spec(data)


def test_gpu_memory_utilization_env_var_is_refused() -> None:
    with pytest.raises(SpecError, match="runtime.env.*--gpu-memory-utilization"):
        parse_spec({**GOOD, "runtime": {"env": {"GPU_MEMORY_UTILIZATION": "0.9"}}})


def test_example_eval_sets_load() -> None:
    from gantry.scoring import load_chat_set, load_retrieval_set

    root = Path(__file__).resolve().parents[2] / "examples" / "eval"
    assert len(load_retrieval_set(root / "minilm-retrieval.jsonl")) >= 200
    assert len(load_chat_set(root / "chat-smoke.jsonl")) >= 5
