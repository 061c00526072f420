"""A whole release through `gantry release`, on the real Prefect server, engine, registry
and hub endpoint. The CLI contract: last line = record path, exit 0/1/2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT, GantryEnv, embedded_prefect, gantry_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    with embedded_prefect(gantry_env) as (env, _settings):
        yield env


def _gantry(
    env: dict[str, str], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return gantry_cli({**os.environ, **env, "PYTHONUNBUFFERED": "1"}, *args, timeout=timeout)


#: This module's releases go live as a model of their own, with short canary windows: a
#: second release of it (the gated copy, the verify test) runs a canary against the first.
FAST_CANARY = {"window_s": 2, "interval_s": 0.5, "min_requests": 5, "keep_warm_s": 0}


def _spec_file(tmp_path: Path, *, eval_subset: bool = False, **overrides: object) -> Path:
    data = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
    data["mlflow"] = {"model_name": "minilm-cli"}
    data["canary"] = dict(FAST_CANARY)
    if eval_subset:  # a test about something else: every tenth pair is quality enough
        lines = (REPO_ROOT / data["evaluate"]["dataset"]).read_text().splitlines()
        subset = tmp_path / "eval-subset.jsonl"
        subset.write_text("\n".join(lines[::10]) + "\n")
        data["evaluate"]["dataset"] = str(subset)
    data.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_release_then_cached_rerun(
    prefect_env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    spec = _spec_file(tmp_path)
    first = _gantry(prefect_env, "release", str(spec))
    assert first.returncode == 0, first.stderr[-3000:]
    record_path = Path(first.stdout.strip().splitlines()[-1])
    assert record_path.is_file() and record_path.parent == gantry_env.state_dir / "releases"
    record = json.loads(record_path.read_text())
    assert record["status"] == "succeeded" and record["model"] == "minilm"
    stages = ("weights", "build", "scan", "sign", "smoke", "evaluate", "register")
    assert set(record["stages"]) >= set(stages)
    for name in stages:
        st = record["stages"][name]
        assert st["status"] == "succeeded" and isinstance(st["duration_s"], float)
    assert record["stages"]["build"]["result"]["image"].split("@")[1].startswith("sha256:")
    assert record["flow_run_id"]
    scan = record["stages"]["scan"]["result"]
    assert Path(scan["sbom_path"]).is_file() and "counts" in scan and "db_status" in scan
    if not scan["vulnerabilities_checked"]:  # the demo's explicit offline allowance
        assert any("NOT CHECKED" in w.upper() for w in scan["warnings"])
    sign = record["stages"]["sign"]["result"]
    assert sign["signature_ref"] and Path(sign["weights_signature"]).is_file()
    assert set(sign["attestations"]) == {
        "https://cyclonedx.org/bom",
        "https://gantry.dev/attestations/scan-result/v1",
    }
    smoke = record["stages"]["smoke"]["result"]
    assert smoke["cold_start_s"] > 0
    evaluation = record["stages"]["evaluate"]["result"]
    assert evaluation["score"] >= 0.8 and evaluation["n"] >= 200
    registered = record["stages"]["register"]["result"]
    assert registered["version"] and "candidate" in registered["aliases"]
    verified = _gantry(prefect_env, "verify", str(record_path), timeout=300)
    assert verified.returncode == 0, verified.stderr[-2000:]

    gantry_env.reset_hub_stats()
    second = _gantry(prefect_env, "release", str(spec))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip().splitlines()[-1] == str(record_path)
    again = json.loads(record_path.read_text())
    for name in ("weights", "build", "scan", "sign", "smoke", "evaluate", "register"):
        assert again["stages"][name]["cached"], name  # resume, don't redo
    assert again["stages"]["register"]["result"]["version"] == registered["version"]
    assert (
        again["stages"]["build"]["result"]["digest"]
        == record["stages"]["build"]["result"]["digest"]
    )
    assert gantry_env.hub_stats()["requests"]["download"] == 0  # type: ignore[index]
    history = list((record_path.parent / "history").glob(f"{record['release_id']}.*.json"))
    assert history  # the first run's record was kept, not overwritten
    # The tracking store is as the first run left it: neither register nor canary opened it.
    reused = "stage register: re-used from an earlier run"
    assert reused in second.stderr and "is already version" not in second.stderr
    assert again["tracking_store_state"]

    # Any write to the store since (here a tag) and the re-run asks it again.
    from mlflow import MlflowClient

    uri = f"sqlite:///{gantry_env.state_dir / 'mlflow' / 'mlflow.db'}"
    MlflowClient(uri).set_model_version_tag("minilm-cli", registered["version"], "touched", "1")
    third = _gantry(prefect_env, "release", str(spec))
    assert third.returncode == 0, third.stderr[-3000:]
    assert reused not in third.stderr
    assert f"is already version {registered['version']} of minilm-cli" in third.stderr


def test_invalid_spec_exits_2_naming_the_field(prefect_env: dict[str, str], tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, colour="blue")
    done = _gantry(prefect_env, "release", str(spec))
    assert done.returncode == 2
    assert "colour" in done.stderr and "unknown field" in done.stderr


def test_failed_stage_exits_1_with_record(
    prefect_env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    spec = _spec_file(tmp_path, source={"repo_id": gantry_env.repo_id, "revision": "no-such-tag"})
    done = _gantry(prefect_env, "release", str(spec))
    assert done.returncode == 1
    record = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
    weights = record["stages"]["weights"]
    assert weights["status"] == "failed"
    assert weights["error"]["type"] == "RevisionNotFoundError" and not weights["error"]["transient"]
    assert record["stages"]["build"]["status"] == "skipped"
    assert "Retrying" not in done.stderr  # a permanent error is not retried


def test_missing_docker_engine_is_a_clear_error(
    prefect_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**prefect_env, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    done = _gantry(env, "release", str(_spec_file(tmp_path)))
    assert done.returncode == 1
    assert "cannot reach the Docker engine" in done.stderr and "DOCKER_HOST" in done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).is_file()


def test_env_status_json(prefect_env: dict[str, str], gantry_env: GantryEnv) -> None:
    done = _gantry(prefect_env, "env", "status", "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state_dir"] == str(gantry_env.state_dir)
    assert status["registry"] == gantry_env.registry
    assert status["prefect_api_url"].startswith("http://127.0.0.1:")
    assert status["mlflow_tracking_uri"].startswith("sqlite:///")
    assert status["services"]["registry"]["healthy"] and status["services"]["hub"]["healthy"]
    assert status["docker"]["reachable"]


def test_help_lists_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gantry.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    for cmd in ("release", "env", "spec-schema"):
        assert cmd in done.stdout


def test_gated_repo_token_from_prefect_secret(
    prefect_env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    from gantry.localhub.demo import DEMO_TOKEN, GATED_REPO_ID

    make_secret = (
        "from prefect.blocks.system import Secret; "
        f"Secret(value={DEMO_TOKEN!r}).save('hub-token', overwrite=True)"
    )
    subprocess.run(
        [sys.executable, "-c", make_secret],
        env={**os.environ, **prefect_env},
        check=True,
        timeout=120,
        capture_output=True,
    )
    spec = _spec_file(
        tmp_path,
        eval_subset=True,
        source={
            "repo_id": GATED_REPO_ID,
            "revision": "main",
            "token_env": "GANTRY_TEST_UNSET_TOKEN",
            "token_secret": "hub-token",
        },
    )
    done = _gantry(prefect_env, "release", str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    record_text = Path(done.stdout.strip().splitlines()[-1]).read_text()
    assert json.loads(record_text)["stages"]["weights"]["status"] == "succeeded"
    assert DEMO_TOKEN not in record_text and DEMO_TOKEN not in done.stderr

    # Without any token the gated repository is refused with the fix spelled out.
    no_token = _spec_file(
        tmp_path,
        source={
            "repo_id": GATED_REPO_ID,
            "revision": "main",
            "token_env": "GANTRY_TEST_UNSET_TOKEN",
        },
    )
    refused = _gantry(prefect_env, "release", str(no_token))
    assert refused.returncode == 1
    assert "gated" in refused.stderr and "GANTRY_TEST_UNSET_TOKEN" in refused.stderr


def test_verify_refuses_a_changed_weights_file(prefect_env: dict[str, str], tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, eval_subset=True, name="verifyme")
    done = _gantry(prefect_env, "release", str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    record_path = Path(done.stdout.strip().splitlines()[-1])
    record = json.loads(record_path.read_text())
    assert _gantry(prefect_env, "verify", str(record_path), timeout=300).returncode == 0

    model = Path(record["stages"]["weights"]["result"]["path"]) / "onnx" / "model.onnx"
    original = model.read_bytes()
    os.chmod(model, 0o644)
    try:
        model.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
        refused = _gantry(prefect_env, "verify", str(record_path), timeout=300)
        assert refused.returncode == 1
        assert "onnx/model.onnx" in refused.stderr
    finally:
        model.write_bytes(original)
        os.chmod(model, 0o444)
