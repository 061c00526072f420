"""Stage `canary`: the candidate beside the live champion, traffic shifted in steps, each
step judged; rolled back by itself the moment it is worse.

The first release of a model deploys directly (there is nothing to compare with). Later
ones: the candidate (verified, run hardened by digest) joins the router at weight 0, then
takes each of ``canary.steps`` in turn; every step below 100 % gets an analysis window
(:mod:`~gantry.stages.canary.analysis`). A failed check sets the candidate's weight to 0
at once, drains and removes it, and leaves the MLflow `champion` alias on the champion;
all windows passed (and an approval, if asked for) moves traffic and the alias to the
candidate and keeps the old champion warm for ``keep_warm_s`` so that `gantry rollback`
is instant. Every change goes through the transition table
(:mod:`~gantry.stages.canary.machine`), so a run killed at any point is finished by the
next one.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters import containers, docker_engine
from gantry.adapters.haproxy import Slot
from gantry.adapters.mlflow_registry import CHAMPION, ModelVersionRef
from gantry.deploy.docker import ROUTER_IMAGE, DockerTarget
from gantry.deploy.router import Target
from gantry.errors import (
    ApprovalRejectedError,
    CanaryFailedError,
    ChampionUnavailableError,
    ConfigError,
    EvalSetError,
)
from gantry.settings import Settings
from gantry.shared_records import serving_record_for
from gantry.spec import CanaryMetrics, DeployTarget, Protocol, ReleaseSpec
from gantry.stages.build import BuildResult
from gantry.stages.canary import machine as m
from gantry.stages.canary.analysis import StepVerdict, analyse_step, analysed_steps
from gantry.stages.canary.executor import Deployment, Hooks
from gantry.stages.canary.probes import Prober
from gantry.stages.canary.serving import launch_for, release_from_record, start_recorded
from gantry.stages.canary.sources import MetricSource, PrometheusSource, RouterLogSource
from gantry.stages.canary.state import DeploymentStatus, DeploymentStore, Phase, Served, now
from gantry.stages.register import RegisterResult, open_registry
from gantry.stages.sign import SignResult
from gantry.stages.smoke import verify_inputs
from gantry.stages.weights import WeightsResult

log = logging.getLogger("gantry.canary")

STAGE = "canary"
#: How long a new candidate may take to appear in Prometheus (exporter discovery, file SD,
#: first scrape: a few seconds) before the canary gives up as transient.
METRICS_READY_S = 30.0


class CanaryResult(BaseModel):
    """How the release went live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    version: str
    outcome: Literal["deployed", "promoted", "already-champion"] = Field(
        description="deployed: first release, no champion to compare with; promoted: every "
        "analysis window passed; already-champion: a re-run found it serving."
    )
    previous_version: str | None = Field(description="The champion it replaced.")
    endpoint: str = Field(description="The model's URL (the router), on 127.0.0.1.")
    slot: str
    verdicts: tuple[StepVerdict, ...] = ()
    analysis_skipped: bool = Field(
        default=False,
        description="canary.skip_analysis with steps [100]: promoted with no analysis window.",
    )
    cold_start_s: float | None = None
    analysis_s: float = Field(description="Time spent in analysis windows.")
    total_s: float
    warm_until: datetime | None = Field(
        description="Until when the previous champion is kept warm for instant rollback."
    )
    previous_removed: bool = False
    cached: bool = False


def quality_set(spec: ReleaseSpec) -> Path | None:
    """The eval set the quality probes use (evaluate's), or None."""
    from gantry.stages.evaluate import resolve_dataset

    if spec.evaluate.dataset is None or spec.canary.quality_probes == 0:
        return None
    path = resolve_dataset(spec.evaluate.dataset)
    if not path.is_file():
        raise EvalSetError(
            f"eval set {path} (evaluate.dataset) for the canary's quality probes does not exist",
            fix="set evaluate.dataset to an existing JSONL file, or canary.quality_probes: 0",
        )
    return path


def target_for(
    client: docker_engine.DockerClient,
    store: DeploymentStore,
    status: DeploymentStatus,
    spec: ReleaseSpec,
    settings: Settings,
) -> Target:
    """The deploy target ``spec`` names, for the deployment ``status`` describes."""
    if spec.canary.target is not DeployTarget.DOCKER:  # pragma: no cover - one target so far
        raise ConfigError(f"unknown deploy target {spec.canary.target!r}")
    rt = spec.runtime
    if status.runtime_port is not None and (
        status.runtime_port != rt.port or status.health_path != rt.health_path
    ):
        raise ConfigError(
            f"the live deployment of {status.model} serves on runtime port "
            f"{status.runtime_port} with health path {status.health_path}, this release on "
            f"{rt.port} and {rt.health_path}; one router cannot compare them",
            fix="keep runtime.port and runtime.health_path of the live version for this model",
        )
    status.runtime_port, status.health_path = rt.port, rt.health_path
    port = status.port
    if spec.canary.port is not None and port is not None and spec.canary.port != port:
        raise ConfigError(
            f"the endpoint of {status.model} already lives on 127.0.0.1:{port}, not "
            f"canary.port {spec.canary.port}",
            fix=f"remove canary.port or set it to {port}",
        )

    def ensure_router_image() -> None:
        from gantry.localenv.baseimages import ensure_base_image

        ensure_base_image(
            ROUTER_IMAGE, docker_client=client, work_dir=settings.base_images_dir, log=log
        )

    return DockerTarget(
        client,
        model=status.model,
        name=store.name,
        config_path=store.router_config,
        runtime_port=rt.port,
        health_path=rt.health_path,
        port=port or spec.canary.port,
        ensure_router_image=ensure_router_image,
    )


def open_deployment(
    store: DeploymentStore,
    status: DeploymentStatus,
    spec: ReleaseSpec,
    settings: Settings,
    client: docker_engine.DockerClient,
    hooks: Hooks,
) -> Deployment:
    """The deployment ``status`` describes, on ``spec``'s target, with its tracking store
    opened on first use."""
    target = target_for(client, store, status, spec, settings)
    return Deployment(
        store,
        status,
        target,
        functools.partial(open_registry, spec, settings),
        functools.partial(start_recorded, target, client),
        hooks=hooks,
        drain_s=spec.canary.drain_s,
    )


def run(
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    sign: SignResult,
    registered: RegisterResult,
    settings: Settings,
    *,
    hooks: Hooks | None = None,
    client: docker_engine.DockerClient | None = None,
    known_champion: bool = False,
    record: str | None = None,
) -> CanaryResult:
    """Take the registered candidate live (see the module docstring).

    ``known_champion``: the caller knows MLflow's `champion` alias is this version (a
    re-run of a succeeded release whose tracking store has not changed since), so the
    stage only makes sure it serves, without opening the store. ``record``: this run's own
    release record (what the deployment starts the candidate from later); default: the
    newest run of the release that got through `sign`.
    """
    t0 = time.monotonic()
    hooks = hooks or Hooks()
    opts = spec.canary
    model, version = registered.model_name, registered.version
    dataset = quality_set(spec)  # a bad eval set fails before anything moves
    # Started beside the candidate's start, not after it: Prometheus and the exporter take
    # seconds to come up, and the analysis needs them only once the candidate serves.
    metrics_up = _start_metrics(spec, settings)
    if opts.manual_approval and hooks.approve is None:
        raise ConfigError(
            "canary.manual_approval needs a person to approve in the Prefect UI, but this "
            "run has no flow run to pause",
            fix="run the release through Prefect (`gantry release`), or unset "
            "canary.manual_approval",
        )
    store = DeploymentStore(settings.deployments_dir, model)
    client = client or docker_engine.connect(settings.docker_timeout_s)
    with store.lock(opts.lock_wait_s, spec.release_id):
        dep = open_deployment(store, store.load(), spec, settings, client, hooks)
        status = dep.status
        # Only while the deployment agrees: a rollback that landed between this release's
        # canary and its record's fingerprint would be in the fingerprint, but it also made
        # the previous version the deployment's champion again.
        known = (
            known_champion and status.champion is not None and status.champion.version == version
        )
        alias = None if known else dep.registry.get_alias_version(model, CHAMPION)
        if status.champion is not None or status.candidate is not None:
            served = status.champion or status.candidate
            assert served is not None
            dep.apply((m.EnsureRouter({served.slot: 100}),))
        finished = m.finishes_promotion(status, spec.release_id)
        dep.handle(m.Recover(spec.release_id, keep_warm_s=opts.keep_warm_s))
        if finished or known or (alias is not None and alias.version == version):
            return _already_champion(dep, spec, settings, version, t0)
        dep.handle(m.RetirePrevious(force=True))  # its slot is the candidate's now
        verify_inputs(build, weights, sign)  # an unsigned candidate never starts
        if sign.image != build.image:
            raise ChampionUnavailableError(f"the sign stage signed {sign.image}, not {build.image}")
        champion = _live_champion(dep, settings, alias)
        gpus = containers.resolve_gpus(client.info(), spec.smoke.accelerator, spec.smoke.gpus)
        if champion is None and dep.status.champion is not None:
            log.warning(
                "the deployment serves version %s of %s but MLflow names no champion; the "
                "new version replaces it",
                dep.status.champion.version,
                model,
            )
        slot = champion.slot.other if champion else dep.status.free_slot()
        cand = Served(
            version=version,
            release_id=spec.release_id,
            record=record or str(serving_record_for(settings, spec.release_id)),
            image=build.image,
            slot=slot,
        )
        launch = launch_for(spec, build, weights, gpus, version)
        try:
            dep.handle(m.Begin(cand, champion, opts.steps, launch, spec.smoke.deadline_s))
            prober = Prober(spec, dep.target.endpoint, dataset, dep.target.probe_headers)
            try:
                if champion is None:
                    _first_deploy_probe(prober, slot)
                else:
                    if metrics_up is not None:
                        metrics_up.result()
                    source = metric_source(spec, settings, dep.target, cand, champion)
                    _shift(dep, prober, source, spec, slot, champion.slot)
            finally:
                prober.close()
            dep.handle(m.Promote(opts.keep_warm_s))
        except BaseException as exc:
            _settle(dep, exc, opts.keep_warm_s)
            raise
        c = dep.status.canary
        verdicts = tuple(c.verdicts) if c else ()
        cold = round(dep.cold_starts.get(slot, 0.0), 3)
        warm_until, previous = dep.status.previous_warm_until, dep.status.previous
        removed = False
        if previous is not None and opts.keep_warm_s <= 0:
            removed = _retire(dep, force=True)
    if previous is not None and opts.keep_warm_s > 0:
        removed = _keep_warm_then_retire(store, spec, settings, client, hooks, previous, warm_until)
    return CanaryResult(
        model=model,
        version=version,
        outcome="promoted" if champion else "deployed",
        previous_version=champion.version if champion else None,
        endpoint=dep.target.endpoint,
        slot=slot.value,
        verdicts=verdicts,
        analysis_skipped=champion is not None and not analysed_steps(spec.canary.steps),
        cold_start_s=cold,
        analysis_s=round(sum((v.finished_at - v.started_at).total_seconds() for v in verdicts), 3),
        total_s=round(time.monotonic() - t0, 3),
        warm_until=warm_until,
        previous_removed=removed,
    )


def _settle(dep: Deployment, exc: BaseException, keep_warm_s: float) -> None:
    """Whatever stopped the canary (a crash of ours included), no traffic stays
    half-shifted: a promotion is finished (every check passed), anything else rolled
    back. A failure here is logged and noted on ``exc``, which fails the run."""
    c = dep.status.active_canary
    if c is None:
        return  # a failed analysis has rolled back already
    try:
        if c.phase is Phase.PROMOTING:
            dep.handle(m.Promote(keep_warm_s))
        else:
            checks = exc.failed_checks if isinstance(exc, CanaryFailedError) else ()
            reason = f"the canary stopped on an error: {type(exc).__name__}: {exc}"
            dep.handle(m.Abort(reason[:2000], checks))
    except Exception as undo:
        log.error(
            "could not finish the canary of %s after %s: %s; run `gantry rollback %s`",
            dep.model,
            type(exc).__name__,
            undo,
            dep.model,
        )
        exc.add_note(f"and settling the canary failed: {type(undo).__name__}: {undo}")


def _retire(dep: Deployment, *, force: bool) -> bool:
    before = dep.status.previous_retired
    dep.handle(m.RetirePrevious(force=force))
    removed = dep.status.previous_retired and not before
    if removed and dep.status.previous is not None:
        log.info("previous champion %s of %s removed", dep.status.previous.version, dep.model)
    return removed


def _already_champion(
    dep: Deployment, spec: ReleaseSpec, settings: Settings, version: str, t0: float
) -> CanaryResult:
    """A re-run of a release that is live: make sure it serves, change nothing else."""
    champ = dep.status.champion
    if champ is None or champ.version != version:
        # MLflow says champion but this deployment never ran it (e.g. a fresh engine).
        path = serving_record_for(settings, spec.release_id)
        rel = release_from_record(path, f"version {version}")
        champ = Served(
            version=version,
            release_id=spec.release_id,
            record=str(path),
            image=rel.build.image,
            slot=champ.slot.other if champ else Slot.A,
        )
    dep.handle(m.Adopt(champ))
    started = bool(dep.started)
    log.info(
        "version %s of %s is the champion%s",
        version,
        dep.model,
        " (its container was started again)" if started else "",
    )
    status = dep.status
    return CanaryResult(
        model=dep.model,
        version=version,
        outcome="already-champion",
        previous_version=None,
        endpoint=dep.target.endpoint,
        slot=champ.slot.value,
        analysis_s=0.0,
        total_s=round(time.monotonic() - t0, 3),
        warm_until=status.previous_warm_until if not status.previous_retired else None,
        cached=not started,
    )


def _live_champion(
    dep: Deployment, settings: Settings, alias: ModelVersionRef | None
) -> Served | None:
    """The champion the candidate is compared with, serving; None for a first release."""
    if alias is None:
        return None
    champ = dep.status.champion
    if champ is not None and champ.version == alias.version:
        dep.apply((m.EnsureServing(champ, died_is_error=True),))
        return champ
    release_id = alias.tags.get("gantry.release_id", "")
    # Released on another host, perhaps: its record is then read from the shared store.
    path = serving_record_for(settings, release_id)
    rel = release_from_record(path, f"champion version {alias.version} of {dep.model}")
    log.warning(
        "champion version %s of %s is not deployed here; starting it first",
        alias.version,
        dep.model,
    )
    served = Served(
        version=alias.version,
        release_id=release_id,
        record=str(path),
        image=rel.build.image,
        slot=Slot.A if champ is None else champ.slot.other,
    )
    dep.handle(m.Adopt(served))
    return served


def _first_deploy_probe(prober: Prober, slot: Slot) -> None:
    """A first deployment has no champion to compare with; it must answer through the
    router before it takes the alias."""
    if not prober.synthetic(slot):
        raise CanaryFailedError(
            "the first deployment does not answer through the router",
            failed_checks=("health",),
            fix="read the container's log (`docker logs`), fix and release again",
        )


def _start_metrics(spec: ReleaseSpec, settings: Settings) -> Future[None] | None:
    """The exporter and Prometheus (local) starting in the background, when the canary
    reads Prometheus; :func:`metric_source` waits for them."""
    if spec.canary.metrics is not CanaryMetrics.PROMETHEUS:
        return None
    from gantry.localenv.services import metrics_services

    def start() -> None:
        for svc in metrics_services(settings):
            svc.start()

    def report(done: Future[None]) -> None:
        if (exc := done.exception()) is not None:
            log.warning("the metrics services did not start: %s", exc)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-start")
    try:
        started = pool.submit(start)
        started.add_done_callback(report)
        return started
    finally:
        pool.shutdown(wait=False)


def metric_source(
    spec: ReleaseSpec, settings: Settings, target: Target, cand: Served, champion: Served
) -> MetricSource:
    """The ``canary.metrics`` source of this canary; for Prometheus, the exporter and the
    embedded Prometheus started (unless GANTRY_PROMETHEUS_URL names one) and ready, with
    series of both slots, before any traffic moves."""
    if spec.canary.metrics is CanaryMetrics.ROUTER_LOG:
        return RouterLogSource(target)
    from gantry.adapters.prometheus import PrometheusClient
    from gantry.localenv.services import metrics_services
    from gantry.metrics.client import ExporterClient, load_or_create_token, token_path

    for svc in metrics_services(settings):
        svc.start()  # at once when _start_metrics got them up
    token = load_or_create_token(token_path(settings.scrape_targets_dir))
    source = PrometheusSource(
        PrometheusClient(settings.prometheus_url, timeout_s=5),
        ExporterClient(f"http://{settings.exporter_addr}", token),
        deployment=target.name,
        model=target.model,
        release_id=spec.release_id,
        versions={cand.slot: cand.version, champion.slot: champion.version},
        chat=spec.runtime.protocol is Protocol.OPENAI_CHAT,
    )
    source.wait_ready((cand.slot, champion.slot), METRICS_READY_S)
    return source


def _shift(
    dep: Deployment,
    prober: Prober,
    source: MetricSource,
    spec: ReleaseSpec,
    cand: Slot,
    champ: Slot,
) -> None:
    """Every analysed step, then the approval; raises after rolling back."""
    for i, weight in enumerate(analysed_steps(spec.canary.steps)):
        dep.handle(m.Shift(i, weight))
        verdict = analyse_step(dep.target, prober, source, spec.canary, cand, champ, i, weight)
        dep.handle(m.Judged(verdict))
        log.info(
            "step %d (%d %%): %s",
            i + 1,
            weight,
            "passed" if verdict.passed else f"FAILED ({', '.join(verdict.failed_checks)})",
        )
        if not verdict.passed:
            c = dep.status.canary
            assert c is not None
            raise CanaryFailedError(
                f"the canary of {dep.model} version {c.candidate_version} failed and was "
                f"rolled back: {c.message}",
                failed_checks=verdict.failed_checks,
                fix="the champion still serves all traffic; fix the candidate and release "
                "again (or relax the canary.* limit named above if the check is too strict)",
            )
    if spec.canary.manual_approval and dep.hooks.approve is not None:
        c = dep.handle(m.AwaitApproval()).canary
        assert c is not None
        if not dep.hooks.approve(c):
            reason = "promotion to 100 % was not approved"
            dep.handle(m.Abort(reason, ("approval",)))
            raise ApprovalRejectedError(
                f"the canary of {dep.model} version {c.candidate_version}: {reason}; rolled back",
                fix="release again and approve in the Prefect UI within canary.approval_timeout_s",
            )


def _keep_warm_then_retire(
    store: DeploymentStore,
    spec: ReleaseSpec,
    settings: Settings,
    client: docker_engine.DockerClient,
    hooks: Hooks,
    previous: Served,
    until: datetime | None,
) -> bool:
    """Wait (without the lock, so `gantry rollback` stays instant) until the previous
    champion's warm time is over, then remove it unless a rollback brought it back."""
    if until is not None:
        wait = (until - now()).total_seconds()
        if wait > 0:
            log.info("keeping version %s warm for %.0fs (instant rollback)", previous.version, wait)
            time.sleep(wait)
    with store.lock(spec.canary.lock_wait_s, f"{spec.release_id} (retire)"):
        status = store.load()
        if status.previous != previous:
            return False  # a rollback or a newer release changed the deployment meanwhile
        return _retire(open_deployment(store, status, spec, settings, client, hooks), force=False)
