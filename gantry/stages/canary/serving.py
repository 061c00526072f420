"""Starting a recorded version again: what a deployment needs to run a release, read back
from its release record, verified before it starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gantry.adapters import containers, docker_engine
from gantry.deploy.docker import VERSION_LABEL
from gantry.deploy.router import Launch, Target
from gantry.errors import ChampionUnavailableError
from gantry.record import load_record
from gantry.spec import ReleaseSpec
from gantry.stages.build import BuildResult
from gantry.stages.canary.state import Served
from gantry.stages.sign import SignResult
from gantry.stages.smoke import runtime_env, verify_inputs
from gantry.stages.weights import WeightsResult

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


def start_recorded(target: Target, client: docker_engine.DockerClient, served: Served) -> None:
    """Start ``served`` in its slot from its release record; wait until the router sees it."""
    release = release_from_record(Path(served.record), f"version {served.version}")
    cold = target.start(served.slot, verified_launch(release, served.version, client))
    target.readmit(served.slot)
    target.wait_server_up(served.slot, release.spec.smoke.deadline_s)
    log.info("version %s serves in slot %s (cold start %.1fs)", served.version, served.slot, cold)
