"""A model the demo does not use, published to the embedded hub with `hf` and released from
the spec in the README's "Release your own model" section: the path a team with its own
models takes, command for command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gantry.localhub.demo import DEMO_REPO_ID, MODEL_SHA256
from gantry.manifest import WeightsManifest
from tests.support import REPO_ROOT, GantryEnv, embedded_prefect

pytestmark = pytest.mark.e2e

HF = REPO_ROOT / ".venv" / "bin" / "hf"
REPO = "acme/minilm-copy"


@pytest.fixture(scope="module")
def prefect_env(gantry_env: GantryEnv) -> Iterator[dict[str, str]]:
    with embedded_prefect(gantry_env, remove_deployments=True) as (env, _settings):
        yield env


def _readme_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## Release your own model\n")
    return text[start : text.index("\n## ", start + 1)]


def _readme_spec() -> dict[str, Any]:
    block = re.search(r"```yaml\n(.*?)```", _readme_section(), re.DOTALL)
    assert block, "the README section has no spec"
    spec: dict[str, Any] = yaml.safe_load(block.group(1))
    return spec


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, env=env, cwd=REPO_ROOT, text=True, capture_output=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv[:3]}: {done.stderr[-3000:]}"
    return done


def test_publish_with_hf_then_release_from_the_readme(
    prefect_env: dict[str, str], gantry_env: GantryEnv, tmp_path: Path
) -> None:
    section = _readme_section()
    for command in (
        "export HF_TOKEN=$(gantry hub token create --write --name me)",
        "export HF_HUB_DISABLE_XET=1",
        "hf upload my-org/my-model ./my-model-dir",
        "hf repos tag create my-org/my-model v1",
        "gantry release my-spec.yaml",
    ):
        assert command in section, command
    env = {**os.environ, **prefect_env, "PYTHONUNBUFFERED": "1"}
    gantry = [sys.executable, "-m", "gantry.cli"]
    token = _run([*gantry, "hub", "token", "create", "--write", "--name", "me"], env, 60)
    env |= {
        "HF_ENDPOINT": gantry_env.hub_url,
        "HF_TOKEN": token.stdout.strip(),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    model_dir = tmp_path / "my-model-dir"
    download = [str(HF), "download", DEMO_REPO_ID, "--revision", "v1", "--local-dir"]
    _run([*download, str(model_dir)], env, 300)
    _run([str(HF), "upload", REPO, str(model_dir)], env, 300)
    _run([str(HF), "repos", "tag", "create", REPO, "v1"], env, 60)

    spec = _readme_spec()
    assert spec["source"] == {"repo_id": "my-org/my-model", "revision": "v1"}
    spec["name"] = "minilm-copy"
    spec["source"]["repo_id"] = REPO
    spec_path = tmp_path / "my-spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    release = _run([*gantry, "release", str(spec_path)], env, 1500)

    record = json.loads(Path(release.stdout.strip().splitlines()[-1]).read_text())
    assert record["status"] == "succeeded", record
    weights = record["stages"]["weights"]["result"]
    from gantry.localhub.store import HubStore
    from gantry.settings import Settings

    store = HubStore(Settings.from_env(gantry_env.env).hub_dir / "store")
    assert weights["repo_id"] == REPO and weights["commit"] == store.resolve(REPO, "v1")
    # Fetched from the new repo's commit (above); its blobs may already sit in the
    # content-addressed weights cache when an earlier test released the demo's same files.
    assert weights["file_count"] > 3 and 0 <= weights["downloaded_files"] <= weights["file_count"]
    manifest = WeightsManifest.model_validate_json(Path(weights["manifest_path"]).read_bytes())
    assert {f.path: f.sha256 for f in manifest.files}["onnx/model.onnx"] == MODEL_SHA256
    for stage in ("weights", "build", "scan", "sign", "smoke", "evaluate", "register", "canary"):
        assert record["stages"][stage]["status"] == "succeeded", stage
