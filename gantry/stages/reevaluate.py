"""Scheduled re-evaluation of every live champion (the logic of flow `reevaluate`).

For each deployment under the state dir whose model has an MLflow `champion`:

1. **verify** what the champion's release record points at: the image still exists in the
   registry (by digest), its signature, the weights' manifest and signature verify, and
   the container in the champion's slot runs that image with those weights (else *drift*);
2. **measure**: the eval set of the champion's spec goes through the LIVE router, routed
   to the champion's slot by header and marked as a quality probe (a canary's statistics
   leave it out). An endpoint that does not answer is retried, then reported as *no
   verdict*: never as a regression;
3. **compare** with the version's accepted score (``eval.<metric>`` of its release run): more
   than ``evaluate.tolerance`` below it, or under ``evaluate.threshold``, is a regression;
4. **restarts**: the champion container's ``RestartCount`` against what the previous
   re-evaluation recorded on the version (MLflow tags): more than 2 restarts a day is a
   problem of its own (the seed checklist's threshold);
5. **re-scan** the image when its last scan is older than ``max_scan_age_hours``; a finding
   that now blocks is reported as a problem of its own;
6. **record**: one MLflow run per model and invocation (experiment ``gantry-reevaluations``)
   linked to the version both ways (run tags, version tags); on a regression the version
   is tagged ``gantry.reevaluation.regressed=true``, the Prefect event
   ``gantry.reevaluation.regressed`` is emitted and, if asked, the model is rolled back to
   its previous champion through `gantry rollback`'s own path.

The stage has no Prefect import: events and the rollback come in through
:class:`ReevalHooks`; the tasks and the report artifact are :mod:`tasks.reevaluate`.

    >>> report = reevaluate_all(ReevaluateOptions(), get_settings())  # doctest: +SKIP
    >>> [(m.model, m.verdict) for m in report.models]  # doctest: +SKIP
    [('minilm', 'passed')]
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import docker.errors
import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gantry import scoring as ev
from gantry.adapters import docker_engine
from gantry.adapters.docker_stats import parse_engine_time
from gantry.adapters.haproxy import Slot, slot_host
from gantry.adapters.mlflow_registry import CHAMPION, MlflowRegistry
from gantry.adapters.registry import RegistryClient
from gantry.deploy import router as deploy_router
from gantry.deploy.docker import VERSION_LABEL
from gantry.errors import (
    ChampionImageMissingError,
    ConfigError,
    EndpointUnavailableError,
    GantryError,
    TransientError,
    is_transient,
)
from gantry.proc import redact_text
from gantry.record import ReleaseRecord, StageRecord, load_record
from gantry.settings import Settings
from gantry.signing.simple import parse_image_ref
from gantry.spec import ReleaseSpec
from gantry.stages import scan as scan_stage
from gantry.stages.build import runtime_dir
from gantry.stages.canary.rollback import RollbackResult, rollback_model
from gantry.stages.canary.run import target_for
from gantry.stages.canary.serving import localized, record_of, release_from_record, verify_release
from gantry.stages.canary.state import DeploymentStatus, DeploymentStore
from gantry.stages.evaluate import EvalResult, dataset_sha256, measure
from gantry.stages.register import open_registry, with_tracking_uri
from gantry.stages.scan import ScanResult

log = logging.getLogger("gantry.reevaluate")

EXPERIMENT = "gantry-reevaluations"
#: Version tag holding when the image was last re-scanned (the record knows the release's).
SCANNED_AT_TAG = "gantry.reevaluation.scanned_at"
#: Local evidence (eval rows, scan reports) kept per model; MLflow keeps every run's copy.
KEEP_LOCAL_RUNS = 24
#: Findings named in a result (the report files hold them all).
MAX_FINDINGS_SHOWN = 20

Verdict = Literal["passed", "regressed", "no-verdict", "skipped", "error"]
Action = Literal["none", "rolled-back", "rollback-unavailable", "rollback-failed"]
EVENT_REGRESSED = "gantry.reevaluation.regressed"
EVENT_NO_VERDICT = "gantry.reevaluation.no-verdict"
EVENT_SCAN_BLOCKED = "gantry.reevaluation.scan-blocked"
#: More restarts a day than this flag the champion's container.
MAX_RESTARTS_PER_DAY = 2.0
#: Version tags: the container and its RestartCount at the last re-evaluation.
RESTART_COUNT_TAG = "gantry.reevaluation.restart_count"
CONTAINER_TAG = "gantry.reevaluation.container_id"
LAST_AT_TAG = "gantry.reevaluation.last_at"


def _now() -> datetime:
    return datetime.now(UTC)


# --- typed options and results -----------------------------------------------------------


class ReevaluateOptions(BaseModel):
    """What one re-evaluation run covers and how it reacts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[str, ...] = Field(
        default=(),
        description="MLflow registered model names; empty: every deployed model with a champion.",
    )
    rollback_on_regression: bool = Field(
        default=False,
        description="On a regression, give traffic and the `champion` alias back to the "
        "previous champion (as `gantry rollback` does).",
    )
    max_scan_age_hours: float = Field(
        default=24,
        ge=0,
        description="An image whose last scan is older than this is scanned again (0: always).",
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; empty: the champion's spec's."
    )
    endpoint_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Tries of the eval set when the live endpoint does not answer, before "
        "the model gets no verdict (each request is also retried, as evaluate.* says).",
    )
    endpoint_retry_delay_s: float = Field(
        default=10, ge=0, le=600, description="Pause between two such tries."
    )
    experiment: str = Field(
        default=EXPERIMENT, min_length=1, description="MLflow experiment of the runs."
    )

    @classmethod
    def of(cls, **values: Any) -> ReevaluateOptions:
        """Validated options; a bad value is a ConfigError naming the field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"re-evaluation option {where}: {first['msg']}",
                fix="correct that parameter of the `reevaluate` run (`gantry reevaluate -h`)",
            ) from None


class ScanCheck(BaseModel):
    """How old the image's last scan was, and the fresh scan when it was too old."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    last_scanned_at: datetime | None = Field(
        description="The newest known scan (release or re-scan); None: unknown."
    )
    max_age_hours: float
    stale: bool
    rescanned: bool = False
    passed: bool | None = Field(default=None, description="The fresh scan's gate.")
    vulnerabilities_checked: bool | None = None
    blocking: tuple[str, ...] = Field(
        default=(), description="Blocking finding ids, worst first (at most 20)."
    )
    blocking_count: int = 0
    report_dir: str | None = None
    error: str | None = Field(default=None, description="Why the re-scan did not finish.")

    @property
    def problem(self) -> str | None:
        if self.error:
            return f"re-scan failed: {self.error}"
        if self.passed is False:
            return (
                f"re-scan: {self.blocking_count} finding(s) now block the image "
                f"({', '.join(self.blocking[:5])})"
            )
        return None


class RestartCheck(BaseModel):
    """How often the champion's container restarted since the last re-evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    container_id: str
    restart_count: int = Field(description="The container's RestartCount now.")
    since: datetime = Field(
        description="The previous re-evaluation, or the container's creation when that one "
        "saw another container (or there was none)."
    )
    restarts: int = Field(description="Restarts since `since`.")
    per_day: float = Field(description="restarts / days since `since`, at least one day.")
    max_per_day: float = MAX_RESTARTS_PER_DAY
    flagged: bool

    @property
    def problem(self) -> str | None:
        if not self.flagged:
            return None
        return (
            f"restarts: the champion's container restarted {self.restarts} time(s) since "
            f"{self.since:%Y-%m-%d %H:%M}Z ({self.per_day:.1f}/day, over "
            f"{self.max_per_day:g}/day): read `docker logs {self.container_id[:12]}` (an OOM "
            "kill means smoke.memory_mb is too small; see evaluate's recommended limits)"
        )


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    message: str
    transient: bool


class ModelReevaluation(BaseModel):
    """One model's re-evaluation: what was measured, decided and done."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    version: str | None = None
    release_id: str | None = None
    image: str | None = None
    endpoint: str | None = None
    slot: str | None = None
    verdict: Verdict = Field(
        description="passed; regressed (beyond tolerance or under the threshold); "
        "no-verdict (the live endpoint did not answer); skipped (nothing to judge: no "
        "champion, no eval set); error (verification or another step failed)."
    )
    reasons: tuple[str, ...] = ()
    metric: str | None = None
    score: float | None = None
    baseline: float | None = Field(default=None, description="The version's accepted score.")
    threshold: float | None = None
    tolerance: float | None = None
    evaluation: EvalResult | None = None
    drift: tuple[str, ...] = Field(
        default=(), description="Where the live container differs from the verified release."
    )
    warnings: tuple[str, ...] = ()
    scan: ScanCheck | None = None
    restarts: RestartCheck | None = None
    action: Action = "none"
    action_detail: str = ""
    rollback: RollbackResult | None = None
    events: tuple[str, ...] = ()
    mlflow_run_id: str | None = None
    error: ErrorInfo | None = None
    started_at: datetime
    seconds: float

    @property
    def problems(self) -> list[str]:
        """Everything that makes this re-evaluation fail (empty: all well)."""
        out: list[str] = []
        if self.verdict in ("regressed", "no-verdict"):
            out.append(f"{self.verdict}: {'; '.join(self.reasons)}")
        if self.error is not None:  # also a later step's (MLflow) after a verdict
            out.append(f"error: {self.error.type}: {self.error.message.splitlines()[0]}")
        elif self.verdict == "error":
            out.append(f"error: {'; '.join(self.reasons)}")
        out += [f"drift: {d}" for d in self.drift]
        if self.scan is not None and self.scan.problem:
            out.append(self.scan.problem)
        if self.restarts is not None and self.restarts.problem:
            out.append(self.restarts.problem)
        if self.action == "rollback-failed":
            out.append(f"rollback failed: {self.action_detail}")
        return out


class ReevaluationReport(BaseModel):
    """Every model's re-evaluation in one run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    started_at: datetime
    finished_at: datetime
    options: ReevaluateOptions
    models: tuple[ModelReevaluation, ...]

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        return [
            f"{m.model}" + (f" v{m.version}" if m.version else "") + f": {p}"
            for m in self.models
            for p in m.problems
        ]


class DeployedModel(BaseModel):
    """A model to re-evaluate: its deployment's status, or why there is none."""

    model_config = ConfigDict(frozen=True)

    model: str
    status: DeploymentStatus | None = None
    problem: str | None = None


@dataclass
class ReevalHooks:
    """What the Prefect layer plugs in: events (model, name, payload) and the rollback."""

    event: Callable[[str, str, Mapping[str, Any]], None] = lambda _m, _n, _p: None
    rollback: Callable[[str], RollbackResult] | None = None
    flow_run_id: str | None = None
    sleep: Callable[[float], None] = field(default=time.sleep)


# --- pure decisions ----------------------------------------------------------------------


def baseline_of(run_metrics: Mapping[str, float], metric: str) -> float | None:
    """The accepted score: stage `register` logs the evaluate result as ``eval.<field>``."""
    value = run_metrics.get(f"eval.{metric}")
    return None if value is None else float(value)


def eval_set_changed(recorded_sha256: str | None, current_sha256: str | None) -> str | None:
    """Why the accepted score does not apply (the eval set is not the one it was measured
    on), or None. A score on another set says nothing about a regression."""
    if recorded_sha256 is None or current_sha256 is None or recorded_sha256 == current_sha256:
        return None
    return (
        f"the eval set changed since the release (sha256 {recorded_sha256[:12]}… → "
        f"{current_sha256[:12]}…): judged against evaluate.threshold only"
    )


def last_scan_at(
    stage: StageRecord | None, scan: ScanResult | None, version_tags: Mapping[str, str]
) -> datetime | None:
    """When the image was last scanned, as far as can be known.

    A release that re-used an earlier scan records its own time on the stage, not the
    scan's; the gate decision file is written only by a real scan, so its time counts.
    A re-scan by this flow leaves its time in a version tag. Unknown: None (= stale).
    """
    found: list[datetime] = []
    if raw := version_tags.get(SCANNED_AT_TAG):
        with contextlib.suppress(ValueError):
            found.append(_aware(datetime.fromisoformat(raw)))
    decision = Path(scan.decision_path) if scan is not None else None
    if decision is not None and decision.is_file():
        found.append(datetime.fromtimestamp(decision.stat().st_mtime, UTC))
    elif stage is not None and not stage.cached and stage.finished_at is not None:
        found.append(_aware(stage.finished_at))
    return max(found) if found else None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def is_stale(last: datetime | None, now: datetime, max_age_hours: float) -> bool:
    """Whether a scan made at ``last`` (None: unknown) is too old to trust."""
    return last is None or (now - last).total_seconds() >= max_age_hours * 3600


def rollback_possible(status: DeploymentStatus) -> str | None:
    """None when `gantry rollback` would give the model back to its previous champion;
    otherwise why not (it would do something else, or nothing)."""
    if status.canary is not None and not status.canary.phase.final:
        return (
            f"a canary of version {status.canary.candidate_version} is in progress; a "
            "rollback now would abort it, not replace the champion"
        )
    if status.previous is None:
        return "there is no previous champion to go back to"
    return None


def drift_of(
    attrs: Mapping[str, Any] | None,
    *,
    image: str,
    weights_path: str,
    mount_point: str,
    version: str,
) -> tuple[str, ...]:
    """Where the champion slot's container (``docker inspect`` attributes; None: no
    container) differs from the verified release: what was verified is not what serves."""
    if attrs is None:
        return ("no container in the champion's slot",)
    out: list[str] = []
    running = (attrs.get("Config") or {}).get("Image")
    if running != image:
        out.append(f"the container runs image {running}, not the champion's {image}")
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    if labels.get(VERSION_LABEL) not in (None, version):
        out.append(f"the container is labelled version {labels[VERSION_LABEL]}, not {version}")
    mounts = [m for m in attrs.get("Mounts") or [] if m.get("Destination") == mount_point]
    want = str(Path(weights_path).resolve())
    if not mounts:
        out.append(f"no weights are mounted at {mount_point}")
    elif str(Path(mounts[0].get("Source", "")).resolve()) != want:
        out.append(
            f"the container mounts weights from {mounts[0].get('Source')}, not the verified "
            f"snapshot {want}"
        )
    elif mounts[0].get("RW"):
        out.append(f"the weights at {mount_point} are mounted writable")
    return tuple(out)


def restart_check(
    attrs: Mapping[str, Any] | None,
    version_tags: Mapping[str, str],
    now: datetime,
    max_per_day: float = MAX_RESTARTS_PER_DAY,
) -> RestartCheck | None:
    """Restarts of the container (``docker inspect`` attributes) since the previous
    re-evaluation (its :data:`RESTART_COUNT_TAG`, :data:`CONTAINER_TAG` and
    :data:`LAST_AT_TAG` version tags); None without a container.

    Another container than the one recorded (a rollback or promotion made a new one), or no
    record, counts from the container's creation. The rate is over at least a day, so a
    run an hour after the last one flags more than 2 restarts in that hour, not one.
    """
    if attrs is None:
        return None
    cid = str(attrs.get("Id") or "")
    count = int(attrs.get("RestartCount") or 0)
    created = _parse_time(str(attrs.get("Created") or "")) or now
    since, base = created, 0
    last_at = _parse_time(version_tags.get(LAST_AT_TAG, ""))
    recorded = version_tags.get(RESTART_COUNT_TAG, "")
    if version_tags.get(CONTAINER_TAG) == cid and recorded.isdigit() and last_at is not None:
        since, base = max(last_at, created), int(recorded)
    restarts = max(0, count - base)
    days = max((now - since) / timedelta(days=1), 1.0)
    per_day = round(restarts / days, 3)
    return RestartCheck(
        container_id=cid,
        restart_count=count,
        since=since,
        restarts=restarts,
        per_day=per_day,
        max_per_day=max_per_day,
        flagged=per_day > max_per_day,
    )


def _parse_time(text: str) -> datetime | None:
    """An engine (nanoseconds, Z) or ISO time, aware; None if it is not one."""
    try:
        t = parse_engine_time(text)
    except ValueError:
        return None
    return _aware(t)


def measure_with_retries(
    once: Callable[[], EvalResult],
    attempts: int,
    delay_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[EvalResult | None, str | None]:
    """(result, None), or (None, why) when every try met a transient failure (the endpoint
    down, the router unreachable): no verdict, never a score. Permanent errors propagate."""
    last = ""
    for attempt in range(attempts):
        if attempt:
            sleep(delay_s)
        try:
            return once(), None
        except TransientError as exc:
            last = exc.message
            log.warning("re-evaluation try %d/%d: %s", attempt + 1, attempts, exc.message)
    return None, f"no answer after {attempts} tries: {last}"


def select_targets(deployments_dir: Path, models: tuple[str, ...]) -> list[DeployedModel]:
    """The deployments to re-evaluate: those named (each must exist), else every one that
    serves a champion. An unreadable status file is a target with a problem."""
    found: dict[str, DeployedModel] = {}
    unreadable: list[DeployedModel] = []
    for path in sorted(deployments_dir.glob("*/status.json")):
        try:
            st = DeploymentStatus.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            unreadable.append(
                DeployedModel(model=path.parent.name, problem=f"unreadable status {path}: {exc}")
            )
            continue
        found[st.model] = DeployedModel(model=st.model, status=st)
    if models:
        return [
            found.get(m)
            or DeployedModel(model=m, problem=f"{m} has no deployment under {deployments_dir}")
            for m in models
        ]
    served = [t for t in found.values() if t.status is not None and t.status.champion]
    return [*served, *unreadable]


# --- one model ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    """A model's outcome as it is being found out (frozen into ModelReevaluation)."""

    model: str
    started_at: datetime
    t0: float
    values: dict[str, Any] = field(default_factory=dict)

    def set(self, **kw: Any) -> None:
        self.values.update(kw)

    def fail(self, exc: Exception) -> None:
        """Record ``exc``; a verdict already reached stands (the error is reported beside)."""
        message = redact_text(str(exc)) or type(exc).__name__
        self.values["error"] = ErrorInfo(
            type=type(exc).__name__, message=message, transient=is_transient(exc)
        )
        if self.values.get("verdict") is None:
            head = exc.message if isinstance(exc, GantryError) else message
            self.values["verdict"] = "error"
            self.values["reasons"] = (redact_text(head).splitlines()[0],)

    def result(self) -> ModelReevaluation:
        return ModelReevaluation(
            model=self.model,
            started_at=self.started_at,
            seconds=round(time.monotonic() - self.t0, 3),
            **{"verdict": "error", **self.values},
        )


def check_image_present(image: str) -> None:
    """ChampionImageMissingError unless the registry still holds ``image`` (by digest).

    Signature verification alone would not notice: the signature lives under its own tag,
    which outlives a deleted image manifest.
    """
    ref = parse_image_ref(image)
    if ref.digest is None:
        raise ChampionImageMissingError(f"{image} is not a reference by digest")
    with RegistryClient(ref.registry) as registry:
        if registry.manifest_digest(ref.repository, ref.digest) is None:
            raise ChampionImageMissingError(
                f"the champion image {image} is missing from the registry {registry.base}"
            )


def _container_attrs(client: docker_engine.DockerClient, name: str) -> dict[str, Any] | None:
    try:
        return dict(client.containers.get(name).attrs)
    except docker.errors.NotFound:
        return None
    except (docker.errors.APIError, requests.RequestException) as exc:
        raise EndpointUnavailableError(f"cannot inspect container {name}: {exc}") from None


def _require_serving(target: deploy_router.Target, slot: Slot) -> None:
    """The router sees the champion's slot up; else the router would send the eval set
    elsewhere (or nowhere), so it must not be scored."""
    state = target.state(slot)
    if not state.running:
        raise EndpointUnavailableError(
            f"the champion's container {target.server_name(slot)} is not running ({state.detail})",
            fix=f"`gantry rollback {target.model}` starts the champion again",
        )
    routed = target.routed(slot)
    if routed is None or not routed.up:
        raise EndpointUnavailableError(
            f"the router does not see the champion's slot {slot.value} as up "
            f"({routed.detail if routed else 'no such server'})",
            fix=f"check `docker logs {target.server_name(slot)}`; `gantry rollback "
            f"{target.model}` starts the champion again",
        )


def _run_dir(settings: Settings, store: DeploymentStore, at: datetime) -> Path:
    """``<state>/reevaluations/<deployment>/<time>/``; older ones beyond the last
    KEEP_LOCAL_RUNS are removed (MLflow holds their copies)."""
    root = settings.state_dir / "reevaluations" / store.name
    root.mkdir(parents=True, exist_ok=True)
    earlier = sorted(p for p in root.iterdir() if p.is_dir())
    for old in earlier[: max(0, len(earlier) - (KEEP_LOCAL_RUNS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    path = root / at.strftime("%Y%m%dT%H%M%S.%fZ")
    path.mkdir()
    return path


def _rescan(
    spec: ReleaseSpec,
    image: str,
    settings: Settings,
    out_dir: Path,
    last: datetime | None,
    max_age_hours: float,
) -> ScanCheck:
    """The image scanned again by digest with the spec's policy (and the DB as it is now)."""
    from gantry.adapters import trivy

    base = {"last_scanned_at": last, "max_age_hours": max_age_hours, "stale": True}
    try:
        result = scan_stage.run(
            image,
            runtime_dir(spec) / "Dockerfile",
            spec.scan,
            out_dir,
            settings.cache_dir / "trivy",
            insecure=trivy.is_loopback_registry(image),
        )
    except GantryError as exc:
        return ScanCheck(**base, error=exc.message.splitlines()[0][:500], report_dir=str(out_dir))
    return ScanCheck(
        **base,
        rescanned=True,
        passed=result.passed,
        vulnerabilities_checked=result.vulnerabilities_checked,
        blocking=tuple(f.id for f in result.blocking[:MAX_FINDINGS_SHOWN]),
        blocking_count=len(result.blocking),
        report_dir=str(out_dir),
    )


def reevaluate_model(
    target: DeployedModel,
    settings: Settings,
    opts: ReevaluateOptions,
    hooks: ReevalHooks | None = None,
    *,
    now: Callable[[], datetime] = _now,
) -> ModelReevaluation:
    """Re-evaluate one model (see the module docstring). The model's own failures do not
    raise: they are in the result (``verdict`` error or no-verdict, ``problems``)."""
    acc = _Outcome(model=target.model, started_at=now(), t0=time.monotonic())
    try:
        _reevaluate(acc, target, settings, opts, hooks or ReevalHooks(), now)
    except Exception as exc:  # a bug met by one model must not cost the others their turn
        log.exception("re-evaluation of %s failed unexpectedly", target.model)
        acc.fail(exc)
    return acc.result()


def _reevaluate(
    acc: _Outcome,
    target: DeployedModel,
    settings: Settings,
    opts: ReevaluateOptions,
    hooks: ReevalHooks,
    now: Callable[[], datetime],
) -> None:
    status, champ = target.status, target.status.champion if target.status else None
    if status is None or champ is None:
        acc.set(verdict="error", reasons=(target.problem or f"{target.model} has no champion",))
        return
    acc.set(
        version=champ.version,
        release_id=champ.release_id,
        image=champ.image,
        slot=champ.slot.value,
        endpoint=f"http://127.0.0.1:{status.port}" if status.port else None,
    )
    try:
        # Another host may have deployed it (hosts sharing the deployments): its record and
        # files are then read from the shared store.
        champ_record = record_of(champ, settings)
        release = localized(
            release_from_record(
                champ_record, f"champion version {champ.version} of {status.model}"
            ),
            champ.release_id,
            settings,
        )
        spec = with_tracking_uri(release.spec, opts.tracking_uri)
        registry = open_registry(spec, settings)
        alias = registry.get_alias_version(status.model, CHAMPION)
        if alias is not None and alias.version != champ.version:
            raise ConfigError(
                f"the deployment serves version {champ.version} but MLflow's champion is "
                f"version {alias.version} (a promotion or rollback did not finish)",
                fix=f"`gantry rollback {status.model}` puts both on one version",
            )
    except GantryError as exc:
        acc.fail(exc)
        return
    if alias is None:
        acc.set(verdict="skipped", reasons=(f"MLflow names no `champion` of {status.model}",))
        return

    acc.set(
        image=release.build.image,
        metric=spec.evaluate.metric,
        threshold=spec.evaluate.threshold,
        tolerance=spec.evaluate.tolerance,
    )
    store = DeploymentStore(settings.deployments_dir, status.model)
    run_dir = _run_dir(settings, store, acc.started_at)
    record: ReleaseRecord | None = None
    with contextlib.suppress(OSError, ValueError):  # release_from_record has read it
        record = load_record(champ_record)
    image_missing = False
    try:
        # Verification before use: nothing is judged on an image or weights that fail it.
        check_image_present(release.build.image)
        verify_release(release, f"champion version {champ.version}")
        client = docker_engine.connect(settings.docker_timeout_s)
        try:
            attrs = _container_attrs(client, slot_host(store.name, champ.slot))
            acc.set(restarts=restart_check(attrs, dict(alias.tags), now()))
            acc.set(
                drift=drift_of(
                    attrs,
                    image=release.build.image,
                    weights_path=release.weights.path,
                    mount_point=spec.runtime.model_mount,
                    version=champ.version,
                )
            )
            baseline = baseline_of(_run_metrics(registry, alias.run_id), spec.evaluate.metric)
            if note := eval_set_changed(_recorded_eval_set(record), dataset_sha256(spec)):
                log.warning("%s: %s", status.model, note)
                acc.set(warnings=(note,))
                baseline = None
            acc.set(baseline=baseline)
            _measure(acc, spec, settings, status, store, client, baseline, run_dir, opts, hooks)
        finally:
            client.close()
    except ChampionImageMissingError as exc:
        image_missing = True
        acc.fail(exc)
    except GantryError as exc:
        acc.fail(exc)
    if not image_missing:  # a scan of an image that is gone can only fail
        acc.set(
            scan=_scan_check(
                spec,
                release.build.image,
                record.stages.get("scan") if record else None,
                dict(alias.tags),
                settings,
                run_dir / "scan",
                opts.max_scan_age_hours,
                now(),
            )
        )
    _record(acc, registry, opts, hooks, run_dir, now())
    _act(acc, status, settings, opts, hooks)


def _run_metrics(registry: MlflowRegistry, run_id: str | None) -> dict[str, float]:
    if run_id is None:
        return {}
    return {str(k): float(v) for k, v in registry.get_run(run_id).data.metrics.items()}


def _measure(
    acc: _Outcome,
    spec: ReleaseSpec,
    settings: Settings,
    status: DeploymentStatus,
    store: DeploymentStore,
    client: docker_engine.DockerClient,
    baseline: float | None,
    run_dir: Path,
    opts: ReevaluateOptions,
    hooks: ReevalHooks,
) -> None:
    """The eval set through the live router to the champion's slot, then the verdict."""
    if spec.evaluate.dataset is None:
        acc.set(verdict="skipped", reasons=("the champion's spec has no evaluate.dataset",))
        return
    if status.port is None or status.champion is None:
        raise ConfigError(
            f"the deployment status of {status.model} records no endpoint port",
            fix=f"`gantry rollback {status.model}` starts the router again and records it",
        )
    slot = status.champion.slot
    # The canary's own target: a champion whose runtime port or health path disagrees with
    # its spec's is refused there, as it would be by the next canary.
    target = target_for(client, store, status.model_copy(deep=True), spec, settings)
    metric = spec.evaluate.metric
    accepted: dict[str, float] | None = None if baseline is None else {metric: baseline}

    def once() -> EvalResult:
        _require_serving(target, slot)
        result = measure(
            spec,
            target.endpoint,
            settings,
            champion_metrics=lambda _name: accepted,
            headers=target.probe_headers(slot, "quality"),
            results_path=run_dir / "evaluate" / "results.jsonl",
        )
        # The router sends a request for a slot that went down to the other one: a slot
        # that is not up after the run may not have served all of it.
        _require_serving(target, slot)
        return result

    result, why = measure_with_retries(
        once, opts.endpoint_attempts, opts.endpoint_retry_delay_s, hooks.sleep
    )
    if result is None:
        acc.set(verdict="no-verdict", reasons=(why or "the endpoint did not answer",))
        return
    if result.score is None:
        acc.set(verdict="skipped", evaluation=result, reasons=(result.warning or "not scored",))
        return
    # The release's own gate: under the threshold, or beyond tolerance below the score
    # this version was accepted with.
    gate = ev.gate(result.score, spec.evaluate, baseline)
    regressed, reasons = not gate.passed, gate.reasons
    acc.set(
        evaluation=result,
        score=result.score,
        verdict="regressed" if regressed else "passed",
        reasons=reasons,
    )
    log.info(
        "%s: %s %.4f (accepted %s): %s",
        status.model,
        metric,
        result.score,
        "none" if baseline is None else f"{baseline:.4f}",
        "REGRESSED: " + "; ".join(reasons) if regressed else "passed",
    )


def _recorded_eval_set(record: ReleaseRecord | None) -> str | None:
    stage = record.stages.get("evaluate") if record else None
    sha = (stage.result or {}).get("dataset_sha256") if stage else None
    return str(sha) if sha else None


def _scan_check(
    spec: ReleaseSpec,
    image: str,
    stage: StageRecord | None,
    version_tags: Mapping[str, str],
    settings: Settings,
    out_dir: Path,
    max_age_hours: float,
    at: datetime,
) -> ScanCheck:
    scan: ScanResult | None = None
    if stage is not None and stage.result is not None:
        with contextlib.suppress(ValueError):
            scan = ScanResult.model_validate(stage.result)
    last = last_scan_at(stage, scan, version_tags)
    if not is_stale(last, at, max_age_hours):
        return ScanCheck(last_scanned_at=last, max_age_hours=max_age_hours, stale=False)
    log.info(
        "the last scan of %s (%s) is older than %g h: scanning it again",
        image,
        last.isoformat() if last else "unknown",
        max_age_hours,
    )
    return _rescan(spec, image, settings, out_dir, last, max_age_hours)


def _record(
    acc: _Outcome,
    registry: MlflowRegistry,
    opts: ReevaluateOptions,
    hooks: ReevalHooks,
    run_dir: Path,
    at: datetime,
) -> None:
    """One MLflow run with the evidence, linked to the version both ways by tags."""
    v = acc.values
    model, version, verdict = acc.model, str(v["version"]), str(v.get("verdict", "error"))
    score, baseline = v.get("score"), v.get("baseline")
    scan: ScanCheck | None = v.get("scan")
    try:
        experiment = registry.ensure_experiment(opts.experiment)
        run_tags = {
            "gantry.model": model,
            "gantry.version": version,
            "gantry.reevaluation": "true",
            "gantry.reevaluation.verdict": verdict,
            "gantry.reevaluation.release_id": str(v.get("release_id")),
            "gantry.image_ref": str(v.get("image")),
        }
        if hooks.flow_run_id:
            run_tags["gantry.prefect_flow_run_id"] = hooks.flow_run_id
        run_id = registry.start_run(experiment, f"{model}-v{version}-{at:%Y%m%dT%H%M%SZ}", run_tags)
        params = {
            "metric": str(v.get("metric")),
            "threshold": str(v.get("threshold")),
            "tolerance": str(v.get("tolerance")),
            "endpoint": str(v.get("endpoint")),
            "slot": str(v.get("slot")),
            "max_scan_age_hours": str(opts.max_scan_age_hours),
            "rollback_on_regression": str(opts.rollback_on_regression).lower(),
        }
        metrics: dict[str, float] = {}
        evaluation: EvalResult | None = v.get("evaluation")
        if evaluation is not None:
            metrics.update({f"eval.{k}": val for k, val in evaluation.metrics().items()})
        if score is not None:
            metrics["reeval.score"] = float(score)
            metrics["reeval.regressed"] = 1.0 if verdict == "regressed" else 0.0
            if baseline is not None:
                metrics["reeval.baseline"] = float(baseline)
                metrics["reeval.delta"] = float(score) - float(baseline)
        if scan is not None and scan.last_scanned_at is not None:
            metrics["scan.age_hours"] = (at - scan.last_scanned_at).total_seconds() / 3600
        if scan is not None and scan.rescanned:
            metrics["scan.blocking"] = float(scan.blocking_count)
        restarts: RestartCheck | None = v.get("restarts")
        if restarts is not None:
            metrics["container.restarts"] = float(restarts.restarts)
            metrics["container.restarts_per_day"] = restarts.per_day
        registry.log_batch(run_id, params=params, metrics=metrics)
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            registry.log_artifact(run_id, path, str(path.parent.relative_to(run_dir)) or None)
        acc.set(mlflow_run_id=run_id)
        registry.log_dict(run_id, acc.result().model_dump(mode="json"), "reevaluation.json")
        registry.finish_run(run_id)

        version_tags = {
            "gantry.reevaluation.last_run_id": run_id,
            LAST_AT_TAG: at.isoformat(),
            "gantry.reevaluation.last_verdict": verdict,
        }
        if restarts is not None:  # the next re-evaluation counts from here
            version_tags[RESTART_COUNT_TAG] = str(restarts.restart_count)
            version_tags[CONTAINER_TAG] = restarts.container_id
        if verdict == "regressed":
            version_tags.update(
                {
                    "gantry.reevaluation.regressed": "true",
                    "gantry.reevaluation.score": f"{score:.6g}",
                    "gantry.reevaluation.baseline": "none"
                    if baseline is None
                    else f"{baseline:.6g}",
                    "gantry.reevaluation.at": at.isoformat(),
                    "gantry.reevaluation.run_id": run_id,
                }
            )
        elif verdict == "passed":
            version_tags["gantry.reevaluation.regressed"] = "false"
        if scan is not None and scan.rescanned:
            version_tags[SCANNED_AT_TAG] = at.isoformat()
            version_tags["gantry.reevaluation.scan_passed"] = str(scan.passed).lower()
        registry.set_version_tags(model, version, version_tags)
    except GantryError as exc:
        acc.fail(exc)


def _act(
    acc: _Outcome,
    status: DeploymentStatus,
    settings: Settings,
    opts: ReevaluateOptions,
    hooks: ReevalHooks,
) -> None:
    """Events for what a person must hear about; the rollback when asked for."""
    v = acc.values
    verdict = v.get("verdict")
    payload = {
        "model": acc.model,
        "version": v.get("version"),
        "metric": v.get("metric"),
        "score": v.get("score"),
        "baseline": v.get("baseline"),
        "tolerance": v.get("tolerance"),
        "threshold": v.get("threshold"),
        "reasons": list(v.get("reasons", ())),
        "endpoint": v.get("endpoint"),
        "mlflow_run_id": v.get("mlflow_run_id"),
    }
    events: list[str] = []
    if verdict == "regressed":
        hooks.event(
            acc.model, EVENT_REGRESSED, {**payload, "rollback": opts.rollback_on_regression}
        )
        events.append(EVENT_REGRESSED)
        if opts.rollback_on_regression:
            _rollback(acc, status, settings, opts, hooks)
    elif verdict == "no-verdict":
        hooks.event(acc.model, EVENT_NO_VERDICT, payload)
        events.append(EVENT_NO_VERDICT)
    scan: ScanCheck | None = v.get("scan")
    if scan is not None and scan.passed is False:
        hooks.event(
            acc.model,
            EVENT_SCAN_BLOCKED,
            {**payload, "blocking": list(scan.blocking), "report_dir": scan.report_dir},
        )
        events.append(EVENT_SCAN_BLOCKED)
    acc.set(events=tuple(events))


def _rollback(
    acc: _Outcome,
    status: DeploymentStatus,
    settings: Settings,
    opts: ReevaluateOptions,
    hooks: ReevalHooks,
) -> None:
    if (why := rollback_possible(status)) is not None:
        acc.set(action="rollback-unavailable", action_detail=why)
        log.warning("%s regressed but is not rolled back: %s", acc.model, why)
        return
    rollback = hooks.rollback or (
        lambda m: rollback_model(m, settings, tracking_uri=opts.tracking_uri)
    )
    try:
        result = rollback(acc.model)
    except GantryError as exc:
        acc.set(action="rollback-failed", action_detail=exc.message.splitlines()[0])
        return
    if result.action == "restored-previous":
        acc.set(
            action="rolled-back",
            rollback=result,
            action_detail=f"version {result.champion_version} serves again; version "
            f"{result.removed_version} was removed",
        )
    else:
        acc.set(
            action="rollback-unavailable",
            rollback=result,
            action_detail=f"`gantry rollback` did {result.action!r}, not restore a previous "
            "champion",
        )


def reevaluate_all(
    opts: ReevaluateOptions, settings: Settings, hooks: ReevalHooks | None = None
) -> ReevaluationReport:
    """Prefect-free: every model of ``opts`` in turn (one at a time: parallel eval runs
    would skew each other's latencies), one model's failure never stopping the next. Does
    not raise for a model's problems (see ``report.ok``)."""
    started = _now()
    targets = select_targets(settings.deployments_dir, opts.models)
    results = tuple(reevaluate_model(t, settings, opts, hooks) for t in targets)
    return ReevaluationReport(started_at=started, finished_at=_now(), options=opts, models=results)
