"""Starting a recorded version again: what a deployment needs to run a release, read back
from its release record, verified before it starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from gantry.adapters import containers, docker_engine
from gantry.atomicfile import write_atomic
from gantry.deploy.docker import VERSION_LABEL
from gantry.deploy.router import Launch, Target
from gantry.errors import ChampionUnavailableError
from gantry.record import load_record
from gantry.settings import Settings, get_settings
from gantry.shared_records import serving_record_for, shared_records
from gantry.spec import ReleaseSpec
from gantry.stages import weights as weights_stage
from gantry.stages.build import BuildResult
from gantry.stages.canary.state import Served
from gantry.stages.sign import SignResult, weights_signature_path
from gantry.stages.smoke import runtime_env, verify_inputs
from gantry.stages.weights import WeightsResult, WeightStore

log = logging.getLogger("gantry.canary")


@dataclass(frozen=True)
class Release:
    """A release's spec and the stage results a deployment needs to run it."""

    spec: ReleaseSpec
    build: BuildResult
    weights: WeightsResult
    sign: SignResult


def release_from_record(path: Path, what: str) -> Release:
    """Read back what a recorded release needs to be started again."""
    fix = "release its spec again (every stage is cached), then retry"
    try:
        rec = load_record(path)
    except (OSError, ValueError) as exc:
        raise ChampionUnavailableError(
            f"{what}: its release record {path} is missing or unreadable ({exc}), so it "
            "cannot be started here",
            fix=fix,
        ) from None
    try:
        return Release(
            spec=ReleaseSpec.model_validate(rec.spec),
            build=BuildResult.model_validate(rec.stages["build"].result),
            weights=WeightsResult.model_validate(rec.stages["weights"].result),
            sign=SignResult.model_validate(rec.stages["sign"].result),
        )
    except (KeyError, ValueError) as exc:
        raise ChampionUnavailableError(
            f"{what}: its release record {path} lacks a stage result ({exc})", fix=fix
        ) from None


def launch_for(
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    gpus: int | None,
    version: str,
) -> Launch:
    """How the deployment runs this release: as smoke ran it (hardened, by digest)."""
    rt = spec.runtime
    return Launch(
        image=build.image,
        weights_dir=Path(weights.path),
        mount_point=rt.model_mount,
        port=rt.port,
        health_path=rt.health_path,
        env=runtime_env(spec),
        args=tuple(rt.args),
        cpus=spec.smoke.cpus,
        memory_mb=spec.smoke.memory_mb,
        gpus=gpus,
        deadline_s=spec.smoke.deadline_s,
        labels={
            containers.RELEASE_LABEL: spec.release_id,
            containers.STAGE_LABEL: "deploy",
            VERSION_LABEL: version,
        },
    )


def verify_release(release: Release, what: str) -> None:
    """Raise unless the recorded signature is the image's and the image and weights verify:
    nothing recorded is served or judged on the record's word alone."""
    if release.sign.image != release.build.image:
        raise ChampionUnavailableError(
            f"{what}: the recorded signature is for {release.sign.image}, not {release.build.image}"
        )
    verify_inputs(release.build, release.weights, release.sign)


def verified_launch(release: Release, version: str, client: docker_engine.DockerClient) -> Launch:
    """The launch of ``release`` once its image and weights verify (never unverified)."""
    verify_release(release, f"version {version}")
    spec = release.spec
    gpus = containers.resolve_gpus(client.info(), spec.smoke.accelerator, spec.smoke.gpus)
    return launch_for(spec, release.build, release.weights, gpus, version)


def record_of(served: Served, settings: Settings) -> Path:
    """The record to start ``served`` from: the file the deployment names when this host
    has it; else (another host deployed it, sharing the deployment) the release's record
    on this host or in the shared store."""
    path = Path(served.record)
    return path if path.is_file() else serving_record_for(settings, served.release_id)


def localized(release: Release, release_id: str, settings: Settings) -> Release:
    """``release`` with its files on this host. A record from another host names that
    host's weights snapshot and weights signature: the weights are fetched again by commit
    (they must hash to the recorded manifest digest) and the signature made at release
    time is read from the shared store, so the verification before start is the same."""
    shared = shared_records(settings)
    if shared is None:
        return release  # one host: the verification says what is missing
    release = _local_keys(release, settings)
    w, s = release.weights, release.sign
    have = Path(w.path).is_dir() and Path(w.manifest_path).is_file()
    if have and Path(s.weights_signature).is_file():
        return release
    what = f"release {release_id}"
    log.info("%s was released on another host: fetching its weights by commit here", what)
    source = release.spec.source.model_copy(update={"revision": w.commit})
    here = weights_stage.run(
        source,
        WeightStore(settings.weights_dir),
        token=os.environ.get(source.token_env) or None,
        token_hosts=settings.token_hosts,
    )
    if here.manifest_digest != w.manifest_digest:
        raise ChampionUnavailableError(
            f"{what}: commit {w.commit} of {w.repo_id} now hashes to manifest "
            f"{here.manifest_digest}, not the released {w.manifest_digest}",
            fix="the hub's content changed under a commit id: check the hub, then release "
            "the spec again",
        )
    signature = weights_signature_path(here)
    if not signature.is_file():
        text = shared.weights_signature(release_id, w.manifest_digest)
        if text is None:
            raise ChampionUnavailableError(
                f"{what}: no host kept its weights signature in {shared.where}",
                fix="release its spec again (the stages done are cached), then retry",
            )
        write_atomic(signature, text)
    return replace(
        release, weights=here, sign=s.model_copy(update={"weights_signature": str(signature)})
    )


def _local_keys(release: Release, settings: Settings) -> Release:
    """A record from another host names the public keys where that host keeps them; every
    worker signs with the same pair (the multi topology refuses one host's own), so the
    ones this host resolves for the spec verify it. A different pair fails verification
    before start, as any wrong key does."""
    s = release.sign
    if release.spec.sign.method != "key" or (
        Path(s.public_key).is_file() and Path(s.weights_public_key).is_file()
    ):
        return release
    from gantry.keyring import resolve_keys

    keys = resolve_keys(release.spec.sign, settings)
    here = {
        "public_key": s.public_key if Path(s.public_key).is_file() else keys.image_pub,
        "weights_public_key": s.weights_public_key
        if Path(s.weights_public_key).is_file()
        else keys.weights_pub,
    }
    log.info("verifying a release of another host with this host's public keys %s", here)
    return replace(release, sign=s.model_copy(update=here))


def start_recorded(target: Target, client: docker_engine.DockerClient, served: Served) -> None:
    """Start ``served`` in its slot from its release record; wait until the router sees it."""
    settings = get_settings()
    release = localized(
        release_from_record(record_of(served, settings), f"version {served.version}"),
        served.release_id,
        settings,
    )
    cold = target.start(served.slot, verified_launch(release, served.version, client))
    target.readmit(served.slot)
    target.wait_server_up(served.slot, release.spec.smoke.deadline_s)
    log.info("version %s serves in slot %s (cold start %.1fs)", served.version, served.slot, cold)
