"""Stage `canary`: the candidate beside the live champion, traffic shifted in steps, each
step judged; rolled back by itself the moment it is worse. Also `gantry rollback`.

The first release of a model deploys directly (there is nothing to compare with). Later
ones: the candidate (verified, run hardened by digest) joins the router at weight 0, then
takes each of ``canary.steps`` in turn; every step below 100 % gets an analysis window
(success rate and p95/p99 latency against the champion from the router's access log,
quality probes from the eval set, the candidate's health every ``interval_s``). A failed
check sets the candidate's weight to 0 at once, drains and removes it, and leaves the
MLflow `champion` alias alone; all windows passed (and an approval, if asked for) moves
traffic and the alias to the candidate and keeps the old champion warm for
``keep_warm_s`` so that `gantry rollback` is instant.

Every transition is written to the deployment's status file before it is acted on, so a
run killed at any point is finished by the next one: an interrupted canary is rolled
back (or, if it was already promoting, its promotion completed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters import containers, docker_engine
from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry
from gantry.canary import (
    CanaryStatus,
    CheckResult,
    Phase,
    SlotWindow,
    StepVerdict,
    WindowObservations,
    analysed_steps,
    describe_failure,
    failed,
    judge,
    now,
)
from gantry.deploy.docker import VERSION_LABEL, DockerTarget, discover
from gantry.deploy.probes import Prober
from gantry.deploy.router import Launch, Target
from gantry.deploy.state import DeploymentStatus, DeploymentStore, Served
from gantry.errors import (
    ApprovalRejectedError,
    CanaryFailedError,
    ChampionUnavailableError,
    ConfigError,
    DeploymentNotFoundError,
    DeploymentStatusUnreadableError,
    EvalSetError,
    GantryError,
)
from gantry.record import load_record, record_path
from gantry.results import BuildResult, WeightsResult
from gantry.settings import Settings
from gantry.spec import CanaryOptions, DeployTarget, ReleaseSpec
from tasks._retry import retry_transient
from tasks.register import RegisterResult, open_registry
from tasks.sign import SignResult
from tasks.smoke import runtime_env, verify_inputs

log = logging.getLogger("gantry.canary")

STAGE = "canary"


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
    cold_start_s: float | None = None
    analysis_s: float = Field(description="Time spent in analysis windows.")
    total_s: float
    warm_until: datetime | None = Field(
        description="Until when the previous champion is kept warm for instant rollback."
    )
    previous_removed: bool = False
    cached: bool = False


class RollbackResult(BaseModel):
    """What `gantry rollback` did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    action: Literal["aborted-canary", "restored-previous", "restored-champion", "nothing-to-do"]
    champion_version: str | None
    removed_version: str | None
    endpoint: str | None
    seconds: float


@dataclass
class Hooks:
    """What the Prefect layer plugs in: progress reports, approval, events."""

    progress: Callable[[CanaryStatus], None] = lambda _s: None
    approve: Callable[[CanaryStatus], bool] | None = None
    event: Callable[[str, Mapping[str, Any]], None] = lambda _n, _p: None


# --- helpers -----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Release:
    """A release's spec and the stage results a deployment needs to run it."""

    spec: ReleaseSpec
    build: BuildResult
    weights: WeightsResult
    sign: SignResult


def release_from_record(path: Path, what: str) -> _Release:
    """Read back what a recorded release needs to be started again."""
    try:
        rec = load_record(path)
    except (OSError, ValueError) as exc:
        raise ChampionUnavailableError(
            f"{what}: its release record {path} is missing or unreadable ({exc}), so it "
            "cannot be started here",
            fix="release its spec again (every stage is cached), then retry",
        ) from None
    try:
        return _Release(
            spec=ReleaseSpec.model_validate(rec.spec),
            build=BuildResult.model_validate(rec.stages["build"].result),
            weights=WeightsResult.model_validate(rec.stages["weights"].result),
            sign=SignResult.model_validate(rec.stages["sign"].result),
        )
    except (KeyError, ValueError) as exc:
        raise ChampionUnavailableError(
            f"{what}: its release record {path} lacks a stage result ({exc})",
            fix="release its spec again (every stage is cached), then retry",
        ) from None


def quality_set(spec: ReleaseSpec) -> Path | None:
    """The eval set the quality probes use (evaluate's), or None."""
    from tasks.evaluate import resolve_dataset

    if spec.evaluate.dataset is None or spec.canary.quality_probes == 0:
        return None
    path = resolve_dataset(spec.evaluate.dataset)
    if not path.is_file():
        raise EvalSetError(
            f"eval set {path} (evaluate.dataset) for the canary's quality probes does not exist",
            fix="set evaluate.dataset to an existing JSONL file, or canary.quality_probes: 0",
        )
    return path


class _Acc:
    """Accumulates one slot's requests in a window."""

    def __init__(self) -> None:
        self.requests = self.failures = 0
        self.latencies: list[float] = []

    def add(self, rec: AccessRecord) -> None:
        self.requests += 1
        if rec.failed:
            self.failures += 1
        elif rec.total_ms >= 0:
            self.latencies.append(float(rec.total_ms))

    def window(self) -> SlotWindow:
        return SlotWindow(
            requests=self.requests, failures=self.failures, latencies_ms=tuple(self.latencies)
        )


def probes_wanted(min_requests: int, elapsed_s: float, window_s: float, have: int) -> int:
    """Synthetic requests to send now so the candidate reaches ``min_requests`` by 60 %
    of the window (live traffic counts first; the slack covers requests in flight)."""
    due = math.ceil(min_requests * min(1.0, elapsed_s / (0.6 * window_s)))
    return max(0, due - have)


def probes_per_check(opts: CanaryOptions) -> int:
    """Synthetic requests sent at most per check interval (each to both versions)."""
    return max(1, int(opts.probe_rps * opts.interval_s))


def min_observation_s(opts: CanaryOptions) -> float:
    """The shortest traffic observation synthetic probes can fill to ``min_requests``:
    they go out at most :func:`probes_per_check` per interval and are paced to arrive by
    60 % of the observation (see :func:`probes_wanted`), plus one interval for the last."""
    rate = probes_per_check(opts) / opts.interval_s
    return opts.min_requests / rate / 0.6 + opts.interval_s


def verdict_summary(verdicts: tuple[StepVerdict, ...] | list[StepVerdict]) -> str:
    return json.dumps(
        [
            {"weight": v.weight, "passed": v.passed, "failed": list(v.failed_checks)}
            for v in verdicts
        ]
    )


# --- the deployment: every operation on one model's live traffic -------------------------


class Deployment:
    """One model's deployment, with its status persisted before every action."""

    def __init__(
        self,
        store: DeploymentStore,
        status: DeploymentStatus,
        target: Target,
        registry: Callable[[], MlflowRegistry],
        settings: Settings,
        client: docker_engine.DockerClient,
        hooks: Hooks,
        drain_s: float,
        keep_warm_s: float = 0.0,
    ) -> None:
        self.store, self.status, self.target = store, status, target
        self.settings, self.client = settings, client
        self.hooks, self.drain_s, self.keep_warm_s = hooks, drain_s, keep_warm_s
        self._open_registry = registry

    @classmethod
    def of(
        cls,
        store: DeploymentStore,
        status: DeploymentStatus,
        spec: ReleaseSpec,
        settings: Settings,
        client: docker_engine.DockerClient,
        hooks: Hooks,
        *,
        keep_warm_s: float = 0.0,
    ) -> Deployment:
        """The deployment ``status`` describes, on ``spec``'s target, with its tracking
        store opened on first use."""
        return cls(
            store,
            status,
            _target(client, store, status, spec, settings),
            functools.partial(open_registry, spec, settings),
            settings,
            client,
            hooks,
            spec.canary.drain_s,
            keep_warm_s,
        )

    @functools.cached_property
    def registry(self) -> MlflowRegistry:
        """Opened on first use: a re-run that only checks the champion serves never needs
        it (importing MLflow and opening its store is most of such a run)."""
        return self._open_registry()

    @property
    def model(self) -> str:
        return self.status.model

    def save(self) -> None:
        self.status.port = self.target.port
        self.store.save(self.status)
        if self.status.canary is not None:
            self.hooks.progress(self.status.canary)

    # --- serving ------------------------------------------------------------------------

    def _start(self, served: Served, release: _Release) -> float:
        """Verify and start ``served`` in its slot; wait for the router to see it up."""
        if release.sign.image != release.build.image:
            raise ChampionUnavailableError(
                f"version {served.version}: the recorded signature is for {release.sign.image}, "
                f"not {release.build.image}"
            )
        verify_inputs(release.build, release.weights, release.sign)
        gpus = containers.resolve_gpus(
            self.client.info(), release.spec.smoke.accelerator, release.spec.smoke.gpus
        )
        launch = launch_for(release.spec, release.build, release.weights, gpus, served.version)
        cold = self.target.start(served.slot, launch)
        self.target.readmit(served.slot)
        self.target.wait_server_up(served.slot, release.spec.smoke.deadline_s)
        log.info(
            "version %s serves in slot %s (cold start %.1fs)", served.version, served.slot, cold
        )
        return cold

    def ensure_serving(self, served: Served, *, died_is_error: bool) -> bool:
        """Make sure ``served`` runs; start it again from its release record if its
        container is missing (or dead, unless ``died_is_error``). Whether it was started."""
        state = self.target.state(served.slot)
        if state.running:
            return False
        if state.detail != "missing" and died_is_error:
            raise ChampionUnavailableError(
                f"the champion of {self.model} (version {served.version}, container "
                f"{self.target.server_name(served.slot)}) is not serving: {state.detail}. "
                f"Its last log lines:\n{self.target.logs(served.slot)}"
            )
        log.warning(
            "version %s of %s is not running (%s); starting it again",
            served.version,
            self.model,
            state.detail,
        )
        self._start(served, release_from_record(Path(served.record), f"version {served.version}"))
        return True

    def remove_orphans(self) -> None:
        """Containers in a slot that the status does not account for (a run killed between
        starting a container and recording it) are removed."""
        used = {s.slot for s in (self.status.champion, self.status.candidate) if s is not None}
        prev = self.status.previous
        if prev is not None and not self.status.previous_retired:
            used.add(prev.slot)
        for slot in Slot:
            if slot not in used and self.target.state(slot).detail != "missing":
                log.warning("removing %s: no version of the deployment uses it", slot.value)
                self.target.remove(slot)

    # --- transitions ----------------------------------------------------------------------

    def rollback_candidate(self, reason: str, checks: tuple[str, ...] = ()) -> None:
        """Champion to 100 % (started again first if it died), candidate drained and
        removed, verdict recorded. Never touches the `champion` alias."""
        c, cand, champ = self.status.canary, self.status.candidate, self.status.champion
        if c is not None:
            if checks:
                c.failed_checks = checks
                c.first_failure_at = c.first_failure_at or now()
            c.to(Phase.ROLLING_BACK, reason)
        self.save()
        if champ is not None and cand is not None and champ.slot != cand.slot:
            self.ensure_serving(champ, died_is_error=False)
            with contextlib.suppress(GantryError):
                self.target.readmit(champ.slot)
            self.target.set_weights({champ.slot: 100, cand.slot: 0})
            if c is not None:
                c.weight, c.weight_zero_at = 0, now()
            self.save()
            self.target.retire(cand.slot, self.drain_s)
            self.target.remove(cand.slot)
        elif cand is not None:
            # No champion to fall back to (a first deployment that failed): nothing serves.
            self.target.remove(cand.slot)
        self.status.candidate = None
        if c is not None:
            c.to(Phase.ROLLED_BACK, reason)
            self.store.archive_canary(c)
        self.save()
        log.warning("canary of %s rolled back: %s", self.model, reason)
        if cand is not None and c is not None:
            tags = {
                "gantry.canary.outcome": "rolled-back",
                "gantry.canary.reason": reason[:5000],
                "gantry.canary.failed_checks": ",".join(checks),
                "gantry.canary.verdicts": verdict_summary(c.verdicts)[:5000],
            }
            if c.decided_at is not None:
                tags["gantry.canary.decision_s"] = (
                    f"{(c.decided_at - c.started_at).total_seconds():.1f}"
                )
            self.registry.set_version_tags(self.model, cand.version, tags)
            self.hooks.event(
                "gantry.canary.rolled-back",
                {
                    "model": self.model,
                    "version": cand.version,
                    "release_id": cand.release_id,
                    "reason": reason,
                    "failed_checks": list(checks),
                },
            )

    def promote(self) -> None:
        """Candidate to 100 %, alias `champion` moved, old champion kept warm."""
        c, cand, champ = self.status.canary, self.status.candidate, self.status.champion
        if c is None or cand is None:
            raise ConfigError(f"nothing to promote in the deployment of {self.model}")
        c.to(Phase.PROMOTING)
        self.save()
        weights = {cand.slot: 100}
        if champ is not None and champ.slot != cand.slot:
            weights[champ.slot] = 0
        self.target.set_weights(weights)
        c.weight = 100
        self.registry.set_alias(self.model, CHAMPION, cand.version)
        at = now()
        if champ is not None and champ.version != cand.version:
            try:
                self.registry.set_version_tags(
                    self.model,
                    champ.version,
                    {"gantry.superseded_by": cand.version, "gantry.retired_at": at.isoformat()},
                )
            except GantryError as exc:  # e.g. a version MLflow no longer has
                log.warning("could not tag the superseded version %s: %s", champ.version, exc)
        tags = {
            "gantry.canary.outcome": "promoted" if champ else "deployed",
            "gantry.canary.decision_s": f"{(at - c.started_at).total_seconds():.1f}",
            "gantry.canary.verdicts": verdict_summary(c.verdicts)[:5000],
            "gantry.promoted_at": at.isoformat(),
        }
        self.registry.set_version_tags(self.model, cand.version, tags)
        keep = self.keep_warm_s
        self.status.previous = champ if champ is not None and champ.slot != cand.slot else None
        self.status.previous_warm_until = at + timedelta(seconds=keep) if champ else None
        self.status.previous_retired = self.status.previous is None
        self.status.champion, self.status.candidate = cand, None
        c.to(Phase.SUCCEEDED, f"version {cand.version} is the champion")
        self.store.archive_canary(c)
        self.save()
        self.hooks.event(
            "gantry.canary.promoted",
            {
                "model": self.model,
                "version": cand.version,
                "previous_version": champ.version if champ else None,
                "release_id": cand.release_id,
            },
        )

    def retire_previous(self, *, force: bool) -> bool:
        """Remove the warm previous champion once its time is up (or now, ``force``)."""
        prev, until = self.status.previous, self.status.previous_warm_until
        if prev is None or self.status.previous_retired:
            return False
        if not force and until is not None and until > now():
            return False
        if self.target.state(prev.slot).detail != "missing":
            if self.target.router_running():
                self.target.retire(prev.slot, self.drain_s)
            self.target.remove(prev.slot)
        self.status.previous_retired = True
        self.save()
        log.info("previous champion %s of %s removed", prev.version, self.model)
        return True

    def recover(self, release_id: str) -> bool:
        """Finish what a killed run left: a canary that was promoting is completed when it
        is this release's (True), any other unfinished canary is rolled back."""
        c = self.status.canary
        if c is None or c.phase.final:
            return False
        if c.phase is Phase.PROMOTING and c.release_id == release_id:
            log.warning("finishing the promotion an earlier run of %s left behind", release_id)
            self.promote()
            return True
        self.rollback_candidate(
            f"the canary of release {c.release_id} was interrupted in phase {c.phase.value}"
        )
        return False


# --- the stage -----------------------------------------------------------------------------


def _target(
    client: docker_engine.DockerClient,
    store: DeploymentStore,
    status: DeploymentStatus,
    spec: ReleaseSpec,
    settings: Settings,
) -> Target:
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
    return DockerTarget(
        client,
        model=status.model,
        name=store.name,
        config_path=store.router_config,
        runtime_port=rt.port,
        health_path=rt.health_path,
        port=port or spec.canary.port,
        ensure_router_image=lambda: _ensure_router_image(client, settings),
    )


def _ensure_router_image(client: docker_engine.DockerClient, settings: Settings) -> None:
    from gantry.deploy.docker import ROUTER_IMAGE
    from gantry.localenv.baseimages import ensure_base_image

    ensure_base_image(
        ROUTER_IMAGE, docker_client=client, work_dir=settings.base_images_dir, log=log
    )


def analyse_step(
    dep: Deployment,
    prober: Prober,
    spec: ReleaseSpec,
    cand: Slot,
    champ: Slot,
    step: int,
    weight: int,
) -> StepVerdict:
    """One analysis window at ``weight``: returns as soon as a check fails, else at the
    window's end with the final judgement."""
    opts = spec.canary
    started, t0 = now(), time.monotonic()
    # Quality first, inside the window: its eval-set batches would queue the small
    # requests behind them and skew the latency comparison, so the traffic checks observe
    # what comes after it (the rest of the window, at least half of it). It also warms the
    # candidate up, as live traffic would.
    quality = prober.quality(cand, champ, opts.quality_probes)
    dep.target.observe()  # what came before belongs to no traffic check
    t_obs = time.monotonic()
    end = max(t0 + opts.window_s, t_obs + max(opts.window_s / 2, min_observation_s(opts)))
    acc = {cand.value: _Acc(), champ.value: _Acc()}
    synthetic = 0
    # Probes run beside the checks: a probe stuck on a dying candidate must not delay the
    # health check that rolls it back.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="canary-probe") as pool:
        while True:
            tick = time.monotonic()
            final = tick >= end
            # The candidate's state first: a crash is the most urgent thing to notice.
            down = _down(dep, cand)
            champ_state = dep.target.state(champ)
            for rec in dep.target.observe():
                if rec.probe == "quality":
                    continue  # eval-set batches: judged by the quality check, not latency
                if rec.server in acc:
                    acc[rec.server].add(rec)
                elif rec.failed:
                    log.warning("the router could not serve a request (%s)", rec.termination)
            obs = WindowObservations(
                candidate=acc[cand.value].window(),
                champion=acc[champ.value].window(),
                quality=quality,
                candidate_down=down,
            )
            checks = judge(obs, opts, final=final)
            if not champ_state.running:
                checks += (
                    CheckResult(
                        name="champion-health",
                        passed=False,
                        detail=f"the champion stopped ({champ_state.detail}): "
                        "no comparison possible",
                    ),
                )
            if failed(checks) or final:
                return StepVerdict(
                    step=step,
                    weight=weight,
                    started_at=started,
                    finished_at=now(),
                    passed=not failed(checks),
                    checks=checks,
                    candidate_requests=obs.candidate.requests,
                    champion_requests=obs.champion.requests,
                    synthetic_requests=synthetic,
                )
            due = probes_wanted(
                opts.min_requests, tick - t_obs, end - t_obs, obs.candidate.requests
            )
            for _ in range(min(due, probes_per_check(opts))):
                pool.submit(prober.synthetic, cand)
                pool.submit(prober.synthetic, champ)
                synthetic += 2
            time.sleep(max(0.0, opts.interval_s - (time.monotonic() - tick)))


def _down(dep: Deployment, slot: Slot) -> str | None:
    state = dep.target.state(slot)
    if not state.running:
        return f"the candidate's container stopped: {state.detail}"
    routed = dep.target.routed(slot)
    if routed is not None and not routed.up and not routed.parked:
        return f"the router's health check sees the candidate {routed.detail}"
    return None


def run_canary(
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
) -> CanaryResult:
    """Take the registered candidate live (see the module docstring).

    ``known_champion``: the caller knows MLflow's `champion` alias is this version (a
    re-run of a succeeded release whose tracking store has not changed since), so the
    stage only makes sure it serves, without opening the store.
    """
    t0 = time.monotonic()
    hooks = hooks or Hooks()
    opts = spec.canary
    model, version = registered.model_name, registered.version
    dataset = quality_set(spec)  # a bad eval set fails before anything moves
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
        status = store.load()
        dep = Deployment.of(
            store, status, spec, settings, client, hooks, keep_warm_s=opts.keep_warm_s
        )
        target = dep.target
        # Only while the deployment agrees: a rollback that landed between this release's
        # canary and its record's fingerprint would be in the fingerprint, but it also made
        # the previous version the deployment's champion again.
        known = (
            known_champion and status.champion is not None and status.champion.version == version
        )
        alias = None if known else dep.registry.get_alias_version(model, CHAMPION)
        if status.champion is not None or status.candidate is not None:
            champ_slot = status.champion.slot if status.champion else Slot.A
            target.ensure({champ_slot: 100})
        finished = dep.recover(spec.release_id)
        dep.remove_orphans()
        if finished or known or (alias is not None and alias.version == version):
            return _already_champion(dep, spec, version, t0)
        dep.retire_previous(force=True)  # its slot is the candidate's now
        verify_inputs(build, weights, sign)  # an unsigned candidate never starts
        if sign.image != build.image:
            raise ChampionUnavailableError(f"the sign stage signed {sign.image}, not {build.image}")
        champion = _live_champion(dep, alias)
        gpus = containers.resolve_gpus(client.info(), spec.smoke.accelerator, spec.smoke.gpus)
        if champion is None and status.champion is not None:
            log.warning(
                "the deployment serves version %s of %s but MLflow names no champion; the "
                "new version replaces it",
                status.champion.version,
                model,
            )
        slot = champion.slot.other if champion else status.free_slot()
        cand = Served(
            version=version,
            release_id=spec.release_id,
            record=str(record_path(settings.releases_dir, spec.release_id)),
            image=build.image,
            slot=slot,
        )
        status.canary = CanaryStatus(
            model=model,
            release_id=spec.release_id,
            candidate_version=version,
            champion_version=champion.version if champion else None,
            steps=opts.steps if champion else (100,),
        )
        status.candidate = cand  # recorded before it starts: a crash leaves nothing unknown
        dep.save()
        try:
            target.ensure({champion.slot if champion else slot: 100})
            cold = target.start(slot, launch_for(spec, build, weights, gpus, version))
            target.readmit(slot)
            target.wait_server_up(slot, spec.smoke.deadline_s)
            prober = Prober(spec, target.endpoint, dataset)
            try:
                if champion is None:
                    _first_deploy_probe(prober, slot)
                else:
                    _shift(dep, prober, spec, slot, champion.slot)
            finally:
                prober.close()
            dep.promote()
        except BaseException as exc:
            # Whatever went wrong (a crash of ours included), no traffic stays half-shifted.
            # A failed analysis has rolled back already; anything else is rolled back here.
            reason = f"the canary stopped on an error: {type(exc).__name__}: {exc}"
            checks = exc.failed_checks if isinstance(exc, CanaryFailedError) else ()
            with contextlib.suppress(Exception):
                if status.canary is not None and not status.canary.phase.final:
                    if status.canary.phase is Phase.PROMOTING:
                        dep.promote()  # every check passed; finish rather than undo
                    else:
                        dep.rollback_candidate(reason[:2000], checks)
            raise
        c = status.canary
        result_verdicts = tuple(c.verdicts) if c else ()
        warm_until = status.previous_warm_until
        previous = status.previous
        removed = False
        if previous is not None and opts.keep_warm_s <= 0:
            removed = dep.retire_previous(force=True)
    if previous is not None and opts.keep_warm_s > 0:
        removed = _keep_warm_then_retire(store, spec, settings, client, hooks, previous, warm_until)
    return CanaryResult(
        model=model,
        version=version,
        outcome="promoted" if champion else "deployed",
        previous_version=champion.version if champion else None,
        endpoint=target.endpoint,
        slot=slot.value,
        verdicts=result_verdicts,
        cold_start_s=round(cold, 3),
        analysis_s=round(
            sum((v.finished_at - v.started_at).total_seconds() for v in result_verdicts), 3
        ),
        total_s=round(time.monotonic() - t0, 3),
        warm_until=warm_until,
        previous_removed=removed,
    )


def _already_champion(dep: Deployment, spec: ReleaseSpec, version: str, t0: float) -> CanaryResult:
    """A re-run of a release that is live: make sure it serves, change nothing else."""
    status = dep.status
    champ = status.champion
    if champ is None or champ.version != version:
        # MLflow says champion but this deployment never ran it (e.g. a fresh engine).
        champ = Served(
            version=version,
            release_id=spec.release_id,
            record=str(record_path(dep.settings.releases_dir, spec.release_id)),
            image="",
            slot=status.champion.slot.other if status.champion else Slot.A,
        )
        rel = release_from_record(Path(champ.record), f"version {version}")
        champ = champ.model_copy(update={"image": rel.build.image})
        status.champion = champ
        dep.save()
    dep.target.ensure({champ.slot: 100})
    started = dep.ensure_serving(champ, died_is_error=False)
    other = champ.slot.other
    if status.previous is None or status.previous_retired:
        dep.target.set_weights({champ.slot: 100, other: 0})
    dep.save()
    log.info(
        "version %s of %s is the champion%s",
        version,
        dep.model,
        " (its container was started again)" if started else "",
    )
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


def _live_champion(dep: Deployment, alias: Any) -> Served | None:
    """The champion the candidate is compared with, serving; None for a first release."""
    status = dep.status
    if alias is None:
        return None
    champ = status.champion
    if champ is None or champ.version != alias.version:
        release_id = alias.tags.get("gantry.release_id", "")
        path = record_path(dep.settings.releases_dir, release_id)
        rel = release_from_record(path, f"champion version {alias.version} of {dep.model}")
        champ = Served(
            version=alias.version,
            release_id=release_id,
            record=str(path),
            image=rel.build.image,
            slot=Slot.A if champ is None else champ.slot.other,
        )
        log.warning(
            "champion version %s of %s is not deployed here; starting it first",
            alias.version,
            dep.model,
        )
        status.champion = champ
        dep.save()
        dep.target.ensure({champ.slot: 100})
        dep.ensure_serving(champ, died_is_error=False)
        dep.target.set_weights({champ.slot: 100, champ.slot.other: 0})
        return champ
    dep.ensure_serving(champ, died_is_error=True)
    return champ


def _first_deploy_probe(prober: Prober, slot: Slot) -> None:
    """A first deployment has no champion to compare with; it must answer through the
    router before it takes the alias."""
    if not prober.synthetic(slot):
        raise CanaryFailedError(
            "the first deployment does not answer through the router",
            failed_checks=("health",),
            fix="read the container's log (`docker logs`), fix and release again",
        )


def _shift(dep: Deployment, prober: Prober, spec: ReleaseSpec, cand: Slot, champ: Slot) -> None:
    """Every analysed step, then the approval; raises CanaryFailedError after rolling back."""
    c = dep.status.canary
    assert c is not None
    for i, weight in enumerate(analysed_steps(spec.canary.steps)):
        c.step, c.weight = i, weight
        c.to(Phase.PROGRESSING, f"{weight} % of traffic on version {c.candidate_version}")
        dep.target.set_weights({cand: weight, champ: 100 - weight})
        dep.save()
        verdict = analyse_step(dep, prober, spec, cand, champ, i, weight)
        c.verdicts.append(verdict)
        dep.save()
        log.info(
            "step %d (%d %%): %s",
            i + 1,
            weight,
            "passed" if verdict.passed else f"FAILED ({', '.join(verdict.failed_checks)})",
        )
        if not verdict.passed:
            # The window ends the moment a check fails: that is when the failure was seen.
            c.first_failure_at = verdict.finished_at
            reason = f"step {i + 1} at {weight} %: {describe_failure(verdict.checks)}"
            dep.rollback_candidate(reason, verdict.failed_checks)
            raise CanaryFailedError(
                f"the canary of {dep.model} version {c.candidate_version} failed and was "
                f"rolled back: {reason}",
                failed_checks=verdict.failed_checks,
                fix="the champion still serves all traffic; fix the candidate and release "
                "again (or relax the canary.* limit named above if the check is too strict)",
            )
    if spec.canary.manual_approval and dep.hooks.approve is not None:
        c.to(Phase.WAITING_APPROVAL, "waiting for a person to approve the step to 100 %")
        dep.save()
        if not dep.hooks.approve(c):
            reason = "promotion to 100 % was not approved"
            dep.rollback_candidate(reason, ("approval",))
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
        dep = Deployment.of(store, status, spec, settings, client, hooks)
        return dep.retire_previous(force=False)


# --- rollback ------------------------------------------------------------------------------


def rollback_model(
    model: str,
    settings: Settings,
    *,
    tracking_uri: str | None = None,
    wait_s: float = 60,
    hooks: Hooks | None = None,
    client: docker_engine.DockerClient | None = None,
) -> RollbackResult:
    """Put the model back on a known-good version, serving 100 %:

    * a canary in progress (or killed mid-way): rolled back, the champion keeps serving;
    * right after a promotion: the previous champion (warm, or started again from its
      release record) takes the traffic and the `champion` alias back;
    * otherwise: the champion is made to serve (started again if it died).
    """
    t0 = time.monotonic()
    hooks = hooks or Hooks()
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
            status = _status_from_engine(store, client, settings, tracking_uri)
        champ = status.champion
        spec = _spec_of(status, tracking_uri)
        target = _target(client, store, status, spec, settings)
        registry = open_registry(spec, settings)
        dep = Deployment(
            store, status, target, lambda: registry, settings, client, hooks, spec.canary.drain_s
        )
        if champ is not None:
            target.ensure({champ.slot: 100})
        c = status.canary
        if c is not None and not c.phase.final:
            version = status.candidate.version if status.candidate else c.candidate_version
            if c.phase is Phase.PROMOTING and champ is not None:
                # The alias may already have moved: re-assert the champion's.
                registry.set_alias(model, CHAMPION, champ.version)
            dep.rollback_candidate(f"rollback requested (canary was {c.phase.value})", ("manual",))
            dep.remove_orphans()
            return _rolled(model, "aborted-canary", status, version, target, t0)
        prev = status.previous
        if prev is not None and champ is not None:
            dep.ensure_serving(prev, died_is_error=False)
            with contextlib.suppress(GantryError):
                target.readmit(prev.slot)
            target.set_weights({prev.slot: 100, champ.slot: 0})
            registry.set_alias(model, CHAMPION, prev.version)
            registry.set_version_tags(
                model,
                champ.version,
                {
                    "gantry.canary.outcome": "rolled-back-after-promotion",
                    "gantry.rolled_back_at": now().isoformat(),
                },
            )
            status.champion, status.previous = prev, None
            status.previous_retired, status.previous_warm_until = True, None
            dep.save()
            target.retire(champ.slot, spec.canary.drain_s)
            target.remove(champ.slot)
            hooks.event(
                "gantry.rollback",
                {"model": model, "version": prev.version, "removed_version": champ.version},
            )
            return _rolled(model, "restored-previous", status, champ.version, target, t0)
        if champ is None:
            raise DeploymentNotFoundError(f"{model} has no champion deployed to go back to")
        started = dep.ensure_serving(champ, died_is_error=False)
        target.set_weights({champ.slot: 100, champ.slot.other: 0})
        dep.remove_orphans()
        dep.save()
        return _rolled(
            model, "restored-champion" if started else "nothing-to-do", status, None, target, t0
        )


def _status_from_engine(
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
            record=str(record_path(settings.releases_dir, r.release_id)),
            image=r.image,
            slot=r.slot,
        )
        for r in running
    ]
    if not servers:
        raise DeploymentNotFoundError(
            f"{store.model}'s status is unreadable and no server of it is running",
            fix=f"move {store.path} aside and release the champion's spec again",
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
            fix=f"move {store.path} aside and release the champion's spec again",
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
    spec = release_from_record(Path(served.record), f"version {served.version}").spec
    if tracking_uri:
        spec = spec.model_copy(
            update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": tracking_uri})}
        )
    return spec


def _rolled(
    model: str,
    action: Literal["aborted-canary", "restored-previous", "restored-champion", "nothing-to-do"],
    status: DeploymentStatus,
    removed: str | None,
    target: Target,
    t0: float,
) -> RollbackResult:
    return RollbackResult(
        model=model,
        action=action,
        champion_version=status.champion.version if status.champion else None,
        removed_version=removed,
        endpoint=target.endpoint,
        seconds=round(time.monotonic() - t0, 3),
    )


# --- Prefect ------------------------------------------------------------------------------


class Approval(RunInput):
    """The form a person fills in the Prefect UI to let a canary go to 100 %."""

    approve: bool = Field(description="Promote the candidate to 100 % of traffic.")
    comment: str = Field(default="", description="Why (kept in the flow run's log).")


def prefect_hooks(spec: ReleaseSpec | None, model: str, last: dict[str, CanaryStatus]) -> Hooks:
    """Progress artifact, approval through `pause_flow_run`, Prefect events; ``last``
    receives the latest status (for the verdict table of a failed canary)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.events import emit_event

    artifact: dict[str, Any] = {}

    def progress(c: CanaryStatus) -> None:
        last["status"] = c
        steps = analysed_steps(c.steps)
        done = len(c.verdicts) + (1 if c.phase.final else 0)
        pct = 100.0 * min(done, len(steps) + 1) / (len(steps) + 1)
        try:
            if "id" not in artifact:
                artifact["id"] = create_progress_artifact(
                    pct,
                    key=f"{_key(model)}-canary",
                    description=f"canary of {model} v{c.candidate_version}: {c.phase.value}",
                )
            else:
                update_progress_artifact(
                    artifact["id"], pct, description=f"{c.phase.value}: {c.message}"
                )
        except Exception as exc:
            log.debug("progress artifact not updated: %s", exc)

    def event(name: str, payload: Mapping[str, Any]) -> None:
        try:
            emit_event(
                event=name,
                resource={
                    "prefect.resource.id": f"gantry.model.{model}",
                    "prefect.resource.name": model,
                },
                payload=dict(payload),
            )
        except Exception as exc:
            log.warning("could not emit Prefect event %s: %s", name, exc)

    approve = None
    if spec is not None and spec.canary.manual_approval:
        timeout = spec.canary.approval_timeout_s

        def approve(c: CanaryStatus) -> bool:
            from prefect.flow_runs import pause_flow_run

            try:
                answer = pause_flow_run(wait_for_input=Approval, timeout=timeout, poll_interval=2)
            except Exception as exc:
                log.warning("no approval for %s v%s: %s", model, c.candidate_version, exc)
                return False
            return bool(answer and answer.approve)

    return Hooks(progress=progress, approve=approve, event=event)


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def verdict_table(verdicts: tuple[StepVerdict, ...] | list[StepVerdict]) -> list[dict[str, str]]:
    """One row per check per step: what the Prefect UI shows of the analysis."""
    rows = []
    for v in verdicts:
        for chk in v.checks:
            rows.append(
                {
                    "step": f"{v.step + 1} ({v.weight} %)",
                    "check": chk.name,
                    "verdict": {True: "pass", False: "FAIL", None: "-"}[chk.passed],
                    "observed": "" if chk.observed is None else f"{chk.observed:g}",
                    "limit": "" if chk.limit is None else f"{chk.limit:g}",
                    "detail": chk.detail,
                }
            )
    return rows


@task(
    name="canary", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient
)
def canary_task(
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    sign: SignResult,
    registered: RegisterResult,
    known_champion: bool = False,
) -> CanaryResult:
    """Prefect task for stage `canary`: progress artifact, verdict table, events.
    ``known_champion``: see :func:`run_canary`."""
    from prefect.artifacts import create_table_artifact

    from gantry.settings import get_settings

    last: dict[str, CanaryStatus] = {}
    hooks = prefect_hooks(spec, registered.model_name, last)
    try:
        result = run_canary(
            spec,
            build,
            weights,
            sign,
            registered,
            get_settings(),
            hooks=hooks,
            known_champion=known_champion,
        )
    except (CanaryFailedError, ApprovalRejectedError) as exc:
        verdicts = last["status"].verdicts if "status" in last else []
        create_table_artifact(
            key=f"{_key(registered.model_name)}-canary-verdicts",
            table=verdict_table(verdicts) or [{"outcome": "rolled back", "reason": exc.message}],
            description=f"canary of v{registered.version}: ROLLED BACK: {exc.message[:500]}",
        )
        raise
    create_table_artifact(
        key=f"{_key(registered.model_name)}-canary-verdicts",
        table=verdict_table(result.verdicts)
        or [{"outcome": result.outcome, "endpoint": result.endpoint}],
        description=f"canary of v{result.version}: {result.outcome} at {result.endpoint}",
    )
    return result
