"""The canary as a state machine: phases, the persisted status, and the pure judgement.

Nothing here touches a router or a container. :class:`CanaryStatus` is what is written
to disk at every transition (so a crashed run can be resumed or rolled back);
:func:`judge` turns one analysis window's observations into check results.

    >>> next_weight((10, 50, 100), 0)
    50
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from gantry.evaluation import percentiles
from gantry.spec import CanaryOptions

#: Samples a percentile needs before it is judged.
MIN_SAMPLES = {95: 20, 99: 100}


def now() -> datetime:
    return datetime.now(UTC)


class Phase(StrEnum):
    """Where a canary is. Only ``succeeded`` and ``rolled-back`` are final."""

    INITIALIZING = "initializing"
    """Candidate verified and starting beside the champion; it has no traffic yet."""
    PROGRESSING = "progressing"
    """The candidate holds ``weight`` % of traffic and its analysis window is running."""
    WAITING_APPROVAL = "waiting-approval"
    """Every window passed; a person must approve the step to 100 %."""
    PROMOTING = "promoting"
    """Every check passed: traffic goes to the candidate and the alias moves. A run
    killed here is finished (not rolled back) when the release is run again."""
    SUCCEEDED = "succeeded"
    """The candidate is the champion; the previous one may still be kept warm."""
    ROLLING_BACK = "rolling-back"
    """A check failed (or a rollback was asked for): the candidate is being taken out."""
    ROLLED_BACK = "rolled-back"
    """The champion serves all traffic again; the candidate is gone."""

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK)


class CheckResult(BaseModel):
    """One analysis check at one moment."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="success-rate, latency-p95, latency-p99, quality, health.")
    passed: bool | None = Field(description="None: not enough data to judge yet.")
    observed: float | None = None
    limit: float | None = None
    detail: str = ""


class StepVerdict(BaseModel):
    """The outcome of one step's analysis window."""

    model_config = ConfigDict(frozen=True)

    step: int
    weight: int
    started_at: datetime
    finished_at: datetime
    passed: bool
    checks: tuple[CheckResult, ...]
    candidate_requests: int
    champion_requests: int
    synthetic_requests: int

    @property
    def failed_checks(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.passed is False)


class CanaryStatus(BaseModel):
    """The durable status of one canary (written at every transition)."""

    model_config = ConfigDict(validate_assignment=True)

    model: str
    release_id: str
    candidate_version: str
    champion_version: str | None
    phase: Phase = Phase.INITIALIZING
    weight: int = 0
    step: int = Field(default=0, description="Index into `steps` of the current step.")
    steps: tuple[int, ...]
    failed_checks: tuple[str, ...] = ()
    verdicts: list[StepVerdict] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=now)
    last_transition_at: datetime = Field(default_factory=now)
    first_failure_at: datetime | None = Field(
        default=None, description="When a check first failed (decision-time measurements)."
    )
    weight_zero_at: datetime | None = Field(
        default=None, description="When a rollback took the candidate's weight to 0."
    )
    decided_at: datetime | None = None
    message: str = ""

    def to(self, phase: Phase, message: str | None = None) -> None:
        self.phase, self.last_transition_at = phase, now()
        if message is not None:
            self.message = message
        if phase.final:
            self.decided_at = self.last_transition_at


def next_weight(steps: Sequence[int], step: int) -> int | None:
    """The candidate's weight after step ``step``; None when ``step`` was the last."""
    return steps[step + 1] if step + 1 < len(steps) else None


def analysed_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """The steps that get an analysis window: all but the final 100 % (the promotion)."""
    return tuple(w for w in steps if w < 100)


# --- observations and judgement ----------------------------------------------------------


class SlotWindow(BaseModel):
    """What one server did in a window (from the router's access log)."""

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    failures: int = 0
    latencies_ms: tuple[float, ...] = ()

    def percentile(self, q: float) -> float | None:
        return percentiles(self.latencies_ms, (q,))[0] if self.latencies_ms else None


class Quality(BaseModel):
    """Quality probe scores of both versions on the same eval-set items."""

    model_config = ConfigDict(frozen=True)

    metric: str
    items: int
    candidate: float
    champion: float


class WindowObservations(BaseModel):
    """Everything one window's judgement is based on."""

    model_config = ConfigDict(frozen=True)

    candidate: SlotWindow
    champion: SlotWindow
    quality: Quality | None = None
    candidate_down: str | None = Field(
        default=None, description="Why the candidate is not serving (exited, unhealthy)."
    )


def judge(obs: WindowObservations, opts: CanaryOptions, *, final: bool) -> tuple[CheckResult, ...]:
    """Check results for the window so far. A check fails early only when more data
    cannot change the outcome; latency is judged at the end of the window (``final``)."""
    checks: list[CheckResult] = []
    if obs.candidate_down:
        checks.append(CheckResult(name="health", passed=False, detail=obs.candidate_down))
    else:
        checks.append(CheckResult(name="health", passed=True))

    cand = obs.candidate
    # Failures beyond what the allowed rate permits over the required sample cannot be
    # undone by more requests: fail now. Otherwise judge the rate at the window's end.
    allowed = opts.max_error_rate * max(cand.requests, opts.min_requests)
    rate = cand.failures / cand.requests if cand.requests else None
    if cand.failures > allowed:
        passed: bool | None = False
    elif final:
        passed = cand.requests >= opts.min_requests and (rate or 0.0) <= opts.max_error_rate
    else:
        passed = None
    detail = f"{cand.failures} of {cand.requests} requests failed"
    if final and cand.requests < opts.min_requests and passed is False:
        detail += f" (fewer than canary.min_requests={opts.min_requests} to judge)"
    checks.append(
        CheckResult(
            name="success-rate",
            passed=passed,
            observed=None if rate is None else round(1 - rate, 4),
            limit=round(1 - opts.max_error_rate, 4),
            detail=detail,
        )
    )

    for q in (95, 99):
        c_ms, base_ms = cand.percentile(q), obs.champion.percentile(q)
        need = MIN_SAMPLES[q]
        if final and len(cand.latencies_ms) < need and c_ms is not None:
            # The p99 of 20 requests is their maximum: one GC pause would fail the step.
            checks.append(
                CheckResult(
                    name=f"latency-p{q}",
                    passed=None,
                    observed=round(c_ms, 1),
                    detail=f"not judged: {len(cand.latencies_ms)} samples, p{q} needs {need}",
                )
            )
            continue
        limit = (
            None if base_ms is None else base_ms * opts.max_latency_ratio + opts.latency_slack_ms
        )
        if not final:
            ok: bool | None = None
        elif c_ms is None:
            ok = False
        else:
            ok = limit is None or c_ms <= limit
        base = "no champion requests" if base_ms is None else f"champion {base_ms:.0f} ms"
        checks.append(
            CheckResult(
                name=f"latency-p{q}",
                passed=ok,
                observed=None if c_ms is None else round(c_ms, 1),
                limit=None if limit is None else round(limit, 1),
                detail=f"candidate {'-' if c_ms is None else f'{c_ms:.0f} ms'} vs {base}",
            )
        )

    if obs.quality is not None:
        qual = obs.quality
        floor = qual.champion - opts.quality_tolerance
        checks.append(
            CheckResult(
                name="quality",
                passed=qual.candidate >= floor,
                observed=round(qual.candidate, 4),
                limit=round(floor, 4),
                detail=f"{qual.metric} on {qual.items} eval items: candidate "
                f"{qual.candidate:.3f} vs champion {qual.champion:.3f}",
            )
        )
    return tuple(checks)


def failed(checks: Sequence[CheckResult]) -> tuple[str, ...]:
    return tuple(c.name for c in checks if c.passed is False)


def describe_failure(checks: Sequence[CheckResult]) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in checks if c.passed is False)
