"""`gantry rollback MODEL`: the model back on a known-good version, serving 100 %.

One event of the transition table (:class:`~gantry.stages.canary.machine.RollbackRequested`):

* a canary in progress (or killed mid-way): rolled back, the champion keeps serving and
  keeps the `champion` alias;
* right after a promotion: the previous champion (warm, or started again from its
  release record) takes the traffic and the alias back;
* otherwise: the champion is made to serve (started again if it died).

A status file that cannot be read is rebuilt from what runs (:func:`rebuild_status`).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from gantry.adapters import docker_engine
from gantry.adapters.mlflow_registry import CHAMPION
from gantry.deploy.docker import discover
from gantry.errors import DeploymentNotFoundError, DeploymentStatusUnreadableError
from gantry.settings import Settings, get_settings
from gantry.shared_records import serving_record_for
from gantry.spec import ReleaseSpec
from gantry.stages.canary import machine as m
from gantry.stages.canary.executor import Hooks
from gantry.stages.canary.run import open_deployment
from gantry.stages.canary.serving import record_of, release_from_record
from gantry.stages.canary.state import CanaryStatus, DeploymentStatus, DeploymentStore, Served
from gantry.stages.register import open_registry, with_tracking_uri

log = logging.getLogger("gantry.canary")

Action = Literal["aborted-canary", "restored-previous", "restored-champion", "nothing-to-do"]


class RollbackResult(BaseModel):
    """What `gantry rollback` did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    action: Action
    champion_version: str | None
    removed_version: str | None
    endpoint: str | None
    seconds: float


def rollback_model(
    model: str,
    settings: Settings,
    *,
    tracking_uri: str | None = None,
    wait_s: float = 60,
    hooks: Hooks | None = None,
    client: docker_engine.DockerClient | None = None,
) -> RollbackResult:
    """Put ``model`` back on a known-good version (see the module docstring)."""
    t0 = time.monotonic()
    store = DeploymentStore(settings.deployments_dir, model)
    if not store.exists():
        raise DeploymentNotFoundError(
            f"{model} has no deployment under {settings.deployments_dir}",
            fix="check the model name (`ls` that directory) and GANTRY_STATE_DIR",
        )
    client = client or docker_engine.connect(settings.docker_timeout_s)
    with store.lock(wait_s, "gantry rollback"):
        try:
            status = store.load()
        except DeploymentStatusUnreadableError as exc:
            log.warning("%s; rebuilding it from the running containers", exc.message)
            status = rebuild_status(store, client, settings, tracking_uri)
        spec = _spec_of(status, tracking_uri)
        dep = open_deployment(store, status, spec, settings, client, hooks or Hooks())
        before = dep.status
        if before.champion is not None:
            dep.apply((m.EnsureRouter({before.champion.slot: 100}),))
        after = dep.handle(m.RollbackRequested())
        action: Action
        if before.active_canary is not None:
            action = "aborted-canary"
            removed = before.candidate.version if before.candidate else None
            removed = removed or before.active_canary.candidate_version
        elif before.withdrawing is not None or before.previous is not None:
            action = "restored-previous"
            gone = before.withdrawing or before.champion
            removed = gone.version if gone else None
        else:
            action = "restored-champion" if dep.started else "nothing-to-do"
            removed = None
        return RollbackResult(
            model=model,
            action=action,
            champion_version=after.champion.version if after.champion else None,
            removed_version=removed,
            endpoint=dep.target.endpoint,
            seconds=round(time.monotonic() - t0, 3),
        )


def rebuild_status(
    store: DeploymentStore,
    client: docker_engine.DockerClient,
    settings: Settings,
    tracking_uri: str | None,
) -> DeploymentStatus:
    """A deployment's status rebuilt from what runs: each server's labels (version,
    release, slot) and image, the router's port, and MLflow's `champion` alias to tell the
    champion from a candidate (whose interrupted canary the rollback then aborts). The
    damaged file is kept beside the new one."""
    running, port = discover(client, store.name)
    servers = [
        Served(
            version=r.version,
            release_id=r.release_id,
            record=str(serving_record_for(settings, r.release_id)),
            image=r.image,
            slot=r.slot,
        )
        for r in running
    ]
    fix = f"move {store.path} aside and release the champion's spec again"
    if not servers:
        raise DeploymentNotFoundError(
            f"{store.model}'s status is unreadable and no server of it is running", fix=fix
        )
    spec = _spec_of(
        DeploymentStatus(model=store.model, name=store.name, champion=servers[0]), tracking_uri
    )
    alias = open_registry(spec, settings).get_alias_version(store.model, CHAMPION)
    champ = next((s for s in servers if alias is not None and s.version == alias.version), None)
    if champ is None:
        raise DeploymentNotFoundError(
            f"{store.model}'s status is unreadable and none of its running versions "
            f"({', '.join(s.version for s in servers)}) is MLflow's champion",
            fix=fix,
        )
    status = DeploymentStatus(
        model=store.model,
        name=store.name,
        port=port,
        runtime_port=spec.runtime.port,
        health_path=spec.runtime.health_path,
        champion=champ,
        candidate=next((s for s in servers if s is not champ), None),
    )
    if status.candidate is not None:
        # Whatever it was doing, it was not finished: the rollback aborts it.
        status.canary = CanaryStatus(
            model=store.model,
            release_id=status.candidate.release_id,
            candidate_version=status.candidate.version,
            champion_version=champ.version,
            steps=spec.canary.steps,
        )
    kept = store.set_aside()
    store.save(status)
    log.warning("kept the unreadable status as %s; rebuilt it from the containers", kept)
    return status


def _spec_of(status: DeploymentStatus, tracking_uri: str | None) -> ReleaseSpec:
    """The spec of the live champion (its runtime and canary settings drive a rollback)."""
    served = status.champion or status.candidate
    if served is None:
        raise DeploymentNotFoundError(f"{status.model} has nothing deployed")
    spec = release_from_record(record_of(served, get_settings()), f"version {served.version}").spec
    return with_tracking_uri(spec, tracking_uri)
