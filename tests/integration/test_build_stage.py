"""Stage `build` on the real Docker engine and the real (embedded) registry."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from gantry.adapters.registry import RegistryClient
from gantry.errors import BaseImageError, RegistryUnavailableError, WeightsInContextError
from gantry.settings import Settings
from gantry.spec import ReleaseSpec, parse_spec
from gantry.stages import build as build_stage
from gantry.stages import weights as weights_stage
from gantry.stages.build import project_root
from gantry.stages.weights import WeightsResult, WeightStore
from tests.support import GantryEnv

pytestmark = pytest.mark.integration

WEIGHT_SUFFIXES = (".onnx", ".safetensors")


def _spec(
    env: GantryEnv, runtime_dir: Path | None = None, name: str = "build-stage"
) -> ReleaseSpec:
    data: dict[str, object] = {
        "name": name,
        "source": {"repo_id": env.repo_id, "revision": "v1", "endpoint": env.hub_url},
    }
    if runtime_dir is not None:
        data["runtime"] = {"dockerfile_dir": str(runtime_dir)}
    return parse_spec(data)


@pytest.fixture(scope="module")
def weights(gantry_env: GantryEnv) -> WeightsResult:
    settings = Settings.from_env()
    return weights_stage.run(_spec(gantry_env).source, WeightStore(settings.weights_dir))


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env(timeout=600)
    yield c
    c.close()


@pytest.fixture(scope="module")
def built(gantry_env: GantryEnv, weights: WeightsResult, client: docker.DockerClient) -> object:
    return build_stage.run(_spec(gantry_env), weights, Settings.from_env(), client)


def _copy_runtime(tmp_path: Path) -> Path:
    dest = tmp_path / "runtime"
    shutil.copytree(
        project_root() / "dockerfiles" / "runtime",
        dest,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return dest


def test_image_is_pushed_by_digest_and_hardened(
    built: object, gantry_env: GantryEnv, weights: WeightsResult, client: docker.DockerClient
) -> None:
    from gantry.stages.build import BuildResult

    assert isinstance(built, BuildResult)
    assert built.image == f"{gantry_env.registry}/gantry/build-stage@{built.digest}"
    reg = RegistryClient(gantry_env.registry)
    try:
        assert reg.manifest_digest("gantry/build-stage", built.tag) == built.digest
    finally:
        reg.close()
    config = client.api.inspect_image(built.image_id)["Config"]
    assert config["User"].split(":")[0] not in ("", "root", "0")
    assert config["Healthcheck"]["StartPeriod"] > 0
    labels = config["Labels"]
    assert labels["ai.gantry.weights.manifest-digest"] == f"sha256:{weights.manifest_digest}"
    assert labels["ai.gantry.weights.uri"] == weights.uri
    assert built.layers and built.size_bytes > 0
    assert not built.cached


def test_no_weights_anywhere_in_the_image(
    built: object, client: docker.DockerClient, tmp_path: Path
) -> None:
    from gantry.stages.build import BuildResult

    assert isinstance(built, BuildResult)
    container = client.containers.create(built.image_id, entrypoint=["true"])
    try:
        export = tmp_path / "fs.tar"
        with export.open("wb") as f:
            for chunk in container.export():
                f.write(chunk)
    finally:
        container.remove(force=True)
    with tarfile.open(export) as tar:
        names = tar.getnames()
    assert len(names) > 1000  # a whole filesystem, not an empty export
    assert [n for n in names if n.lower().endswith(WEIGHT_SUFFIXES)] == []


def test_rebuild_is_cached(
    built: object, gantry_env: GantryEnv, weights: WeightsResult, client: docker.DockerClient
) -> None:
    from gantry.stages.build import BuildResult

    assert isinstance(built, BuildResult)
    again = build_stage.run(_spec(gantry_env), weights, Settings.from_env(), client)
    assert again.cached and again.digest == built.digest


def test_code_only_change_rebuilds_only_the_last_layer(
    built: object,
    gantry_env: GantryEnv,
    weights: WeightsResult,
    client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    from gantry.stages.build import BuildResult

    assert isinstance(built, BuildResult)
    rt = _copy_runtime(tmp_path)
    app = rt / "server" / "gantry_runtime" / "app.py"
    app.write_text(app.read_text() + "\n# a code-only change\n")
    changed = build_stage.run(_spec(gantry_env, rt), weights, Settings.from_env(), client)
    assert changed.digest != built.digest and not changed.cached
    before = client.api.inspect_image(built.image_id)["RootFS"]["Layers"]
    after = client.api.inspect_image(changed.image_id)["RootFS"]["Layers"]
    assert len(before) == len(after)
    assert before[:-1] == after[:-1] and before[-1] != after[-1]


def test_weights_in_context_are_refused(
    gantry_env: GantryEnv, weights: WeightsResult, tmp_path: Path
) -> None:
    rt = _copy_runtime(tmp_path)
    shutil.copy(Path(weights.path) / "onnx" / "model.onnx", rt / "server" / "bundled.dat")
    with pytest.raises(WeightsInContextError, match="bundled.dat.*onnx/model.onnx"):
        build_stage.run(_spec(gantry_env, rt), weights, Settings.from_env())


def test_unresolvable_base_image(
    gantry_env: GantryEnv, weights: WeightsResult, tmp_path: Path
) -> None:
    rt = _copy_runtime(tmp_path)
    df = rt / "Dockerfile"
    df.write_text(
        df.read_text().replace(
            "FROM python:3.11-slim-bookworm AS builder",
            "FROM gantry-test/no-such-base:1 AS builder",
        )
    )
    with pytest.raises(BaseImageError, match="gantry-test/no-such-base:1"):
        build_stage.run(_spec(gantry_env, rt), weights, Settings.from_env())


def test_registry_down_is_transient(gantry_env: GantryEnv, weights: WeightsResult) -> None:
    from tests.support import free_port

    env = {**gantry_env.env, "GANTRY_REGISTRY": f"127.0.0.1:{free_port()}"}
    with pytest.raises(RegistryUnavailableError, match="gantry env up"):
        build_stage.run(_spec(gantry_env), weights, Settings.from_env(env))
