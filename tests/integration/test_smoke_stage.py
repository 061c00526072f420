"""Stage `smoke` on the real Docker engine: the real runtime image, signed, run hardened."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import docker
import pytest

from gantry.adapters.containers import RELEASE_LABEL, STAGE_LABEL
from gantry.adapters.model_signing import sign_weights
from gantry.errors import (
    AcceleratorError,
    ChecksumMismatchError,
    ContainerStartError,
    HealthTimeoutError,
    SignatureVerificationError,
    WeightsSignatureError,
)
from gantry.keyring import password, resolve_keys
from gantry.manifest import WeightsManifest
from gantry.settings import Settings
from gantry.signing.image import generate_keypair, sign_image
from gantry.spec import ReleaseSpec, parse_spec
from gantry.stages import build as build_stage
from gantry.stages import smoke
from gantry.stages import weights as weights_stage
from gantry.stages.build import BuildResult
from gantry.stages.sign import SignResult, weights_signature_path
from gantry.stages.weights import WeightsResult, WeightStore
from tests.support import GantryEnv

pytestmark = pytest.mark.integration


def _spec(env: GantryEnv, **over: Any) -> ReleaseSpec:
    data: dict[str, Any] = {
        "name": "smoke-stage",
        "source": {"repo_id": env.repo_id, "revision": "v1", "endpoint": env.hub_url},
        "smoke": {"accelerator": "cpu", "deadline_s": 60},
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_spec(data)


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env(timeout=600)
    yield c
    c.close()


@pytest.fixture(scope="module")
def weights(gantry_env: GantryEnv) -> WeightsResult:
    return weights_stage.run(_spec(gantry_env).source, WeightStore(Settings.from_env().weights_dir))


@pytest.fixture(scope="module")
def built(
    gantry_env: GantryEnv, weights: WeightsResult, client: docker.DockerClient
) -> BuildResult:
    return build_stage.run(_spec(gantry_env), weights, Settings.from_env(), client)


@pytest.fixture(scope="module")
def signed(gantry_env: GantryEnv, built: BuildResult, weights: WeightsResult) -> SignResult:
    """Image and weights signed the way stage `sign` does, without its scan attestation."""
    spec, settings = _spec(gantry_env), Settings.from_env()
    keys = resolve_keys(spec.sign, settings)
    sig = sign_image(built.image, spec.sign, Path(keys.image_key))
    wsig = sign_weights(
        Path(weights.path),
        private_key=Path(keys.weights_key),
        password=password(spec.sign) or None,
        signature_path=weights_signature_path(weights),
        manifest=WeightsManifest.model_validate_json(Path(weights.manifest_path).read_bytes()),
        password_env=spec.sign.password_env,
    )
    return SignResult(
        image=built.image,
        signer=sig.signer,
        signature_ref=sig.signature_ref,
        public_key=keys.image_pub,
        attestations={},
        weights_signature=str(wsig.path),
        weights_public_key=keys.weights_pub,
        weights_key_fingerprint=wsig.public_key_fingerprint,
        keys_generated=keys.generated,
        cached=False,
        sign_seconds=0.0,
    )


def _smoke_containers(client: docker.DockerClient, spec: ReleaseSpec) -> list[Any]:
    labels = [f"{RELEASE_LABEL}={spec.release_id}", f"{STAGE_LABEL}=smoke"]
    return list(client.containers.list(all=True, filters={"label": labels}))


class _NoDocker:
    """A client that fails the test if anything touches the engine."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"the Docker engine was used ({name}) before verification passed")


def test_smoke_passes_on_the_real_image(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    client: docker.DockerClient,
) -> None:
    spec = _spec(gantry_env)
    settings = Settings.from_env()
    result = smoke.run(spec, built, weights, signed, settings, client)
    assert result.image == built.image and result.attempts == 1
    assert result.provider == "CPUExecutionProvider" and result.accelerator_used == "cpu"
    assert result.gpus_requested is None
    assert 0 < result.cold_start_s < spec.smoke.deadline_s
    assert result.start_period_s == 30
    assert result.recommended_start_period_s >= 2 * result.cold_start_s
    p = result.probe
    assert p.dimensions == 384
    assert p.cosine_similar is not None and p.cosine_dissimilar is not None
    assert p.cosine_similar > p.cosine_dissimilar
    assert Path(result.logs_path) == smoke.smoke_logs_path(settings, spec.release_id)
    assert Path(result.logs_path).is_file()
    assert _smoke_containers(client, spec) == []


def test_unhealthy_runtime_fails_fast_and_leaves_nothing(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    client: docker.DockerClient,
) -> None:
    # /tmp is the container's own empty tmpfs: the runtime reports it cannot load a model.
    spec = _spec(gantry_env, runtime={"env": {"MODEL_PATH": "/tmp"}}, smoke={"deadline_s": 20})
    settings = Settings.from_env()
    t0 = time.monotonic()
    with pytest.raises(ContainerStartError, match="cannot be served") as info:
        smoke.run(spec, built, weights, signed, settings, client)
    assert time.monotonic() - t0 < 20 + 15  # verification + start + the deadline, at most
    assert info.value.logs_tail
    assert smoke.smoke_logs_path(settings, spec.release_id).is_file()
    assert _smoke_containers(client, spec) == []


def test_a_memory_limit_under_the_model_load_fails_with_both_figures(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    client: docker.DockerClient,
) -> None:
    """The demo model's working set is about 235 MiB: at 160 MiB the engine kills it
    while it loads, and smoke fails on the limit, naming it, what it saw, and the fix
    (not a retried start, not a bare "exited with code 137")."""
    from gantry.errors import ResourceLimitError

    spec = _spec(gantry_env, smoke={"memory_mb": 160, "start_attempts": 2})
    with pytest.raises(ResourceLimitError) as info:
        smoke.run(spec, built, weights, signed, Settings.from_env(), client)
    err, text = info.value, str(info.value)
    assert err.configured_mb == 160 and "smoke.memory_mb 160 MiB" in text and "OOM" in text
    assert "fix: " in text and "smoke.memory_mb: " in text.split("fix: ")[1]
    assert _smoke_containers(client, spec) == []


def test_health_never_green_times_out_at_the_deadline(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    client: docker.DockerClient,
) -> None:
    spec = _spec(gantry_env, runtime={"health_path": "/no-such-health"}, smoke={"deadline_s": 8})
    t0 = time.monotonic()
    with pytest.raises(HealthTimeoutError, match="did not answer 200 within 8s"):
        smoke.run(spec, built, weights, signed, Settings.from_env(), client)
    assert time.monotonic() - t0 < 8 + 15
    assert _smoke_containers(client, spec) == []


def test_gpu_on_an_engine_without_gpu_runtime_fails_at_once(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    client: docker.DockerClient,
) -> None:
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.fail("this engine has an NVIDIA runtime; the test needs one without")
    spec = _spec(gantry_env, smoke={"accelerator": "gpu"})
    t0 = time.monotonic()
    with pytest.raises(AcceleratorError, match="nvidia-ctk runtime configure"):
        smoke.run(spec, built, weights, signed, Settings.from_env(), client)
    assert time.monotonic() - t0 < 10
    assert _smoke_containers(client, spec) == []


def test_tampered_weights_are_refused_before_any_container(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    tmp_path: Path,
) -> None:
    copy = tmp_path / "snapshot"
    shutil.copytree(weights.path, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    tampered = weights.model_copy(update={"path": str(copy)})
    with pytest.raises((ChecksumMismatchError, WeightsSignatureError)):
        smoke.run(_spec(gantry_env), built, tampered, signed, Settings.from_env(), _NoDocker())


def test_image_signed_by_another_key_is_refused(
    gantry_env: GantryEnv,
    built: BuildResult,
    weights: WeightsResult,
    signed: SignResult,
    tmp_path: Path,
) -> None:
    _, other_pub = generate_keypair(tmp_path, "")
    forged = signed.model_copy(update={"public_key": str(other_pub)})
    with pytest.raises(SignatureVerificationError):
        smoke.run(_spec(gantry_env), built, weights, forged, Settings.from_env(), _NoDocker())
