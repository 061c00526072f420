"""The canary's analysis: one step's window observed, judged and turned into a verdict.

Pure judgement (:func:`judge`) over what a window saw (:class:`WindowObservations`), and
the loop (:func:`analyse_step`) that gathers it from the canary's metric source
(:mod:`~gantry.stages.canary.sources`: Prometheus queries or the router's log), the
deploy target's server states and the probes. Nothing here changes routing: the verdict
goes back to the state machine.

    >>> next_weight((10, 50, 100), 0)
    50
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.haproxy import AccessRecord, Slot
from gantry.deploy.router import ServerState, Target
from gantry.scoring import percentiles
from gantry.spec import CanaryOptions

if TYPE_CHECKING:
    from gantry.stages.canary.probes import Prober
    from gantry.stages.canary.sources import MetricSource

log = logging.getLogger("gantry.canary")

#: Samples a percentile needs before it is judged.
MIN_SAMPLES = {95: 20, 99: 100}


def _now() -> datetime:
    return datetime.now(UTC)


class CheckResult(BaseModel):
    """One analysis check at one moment."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="success-rate, latency-p95, latency-p99, quality, health.")
    passed: bool | None = Field(description="None: not enough data to judge yet.")
    observed: float | None = None
    limit: float | None = None
    detail: str = ""
    inconclusive: bool = Field(
        default=False,
        description="The data the check needs is missing (the champion could not be "
        "measured): never a pass. A window that ends so is run again, then fails.",
    )
    queries: tuple[str, ...] = Field(
        default=(),
        description="The PromQL the check read (candidate's, then champion's); empty for "
        "the router-log source.",
    )


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
    source: str = Field(default="router-log", description="canary.metrics of the window.")
    quality_at: datetime | None = Field(
        default=None,
        description="When the quality probes' scores were known (decision-time measures).",
    )
    usage: dict[str, float] = Field(
        default_factory=dict,
        description="The candidate's CPU (cores) and memory (MB) p50/p99 over the window, "
        "where the source measures them.",
    )

    @property
    def failed_checks(self) -> tuple[str, ...]:
        """Checks that failed, and those left inconclusive (no data is no pass)."""
        return tuple(c.name for c in self.checks if c.passed is False or c.inconclusive)


def next_weight(steps: Sequence[int], step: int) -> int | None:
    """The candidate's weight after step ``step``; None when ``step`` was the last."""
    return steps[step + 1] if step + 1 < len(steps) else None


def analysed_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """The steps that get an analysis window: all but the final 100 % (the promotion)."""
    return tuple(w for w in steps if w < 100)


class SlotWindow(BaseModel):
    """What one server did in a window, from the canary's metric source."""

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    failures: int = 0
    samples: int = Field(default=0, description="Answered requests behind the percentiles.")
    p95_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def from_latencies(
        cls, requests: int, failures: int, latencies_ms: Sequence[float]
    ) -> SlotWindow:
        """From every answered request's latency (the router-log source)."""
        p95, p99 = percentiles(latencies_ms, (95, 99)) if latencies_ms else (None, None)
        return cls(
            requests=requests, failures=failures, samples=len(latencies_ms), p95_ms=p95, p99_ms=p99
        )

    def percentile(self, q: int) -> float | None:
        return {95: self.p95_ms, 99: self.p99_ms}[q]


class Quality(BaseModel):
    """Quality probe scores of both versions on the same eval-set items."""

    model_config = ConfigDict(frozen=True)

    metric: str
    items: int
    candidate: float
    champion: float | None = Field(description="None: the champion could not be scored.")


class WindowObservations(BaseModel):
    """Everything one window's judgement is based on."""

    model_config = ConfigDict(frozen=True)

    candidate: SlotWindow
    champion: SlotWindow
    quality: Quality | None = None
    candidate_down: str | None = Field(
        default=None, description="Why the candidate is not serving (exited, unhealthy)."
    )
    quality_missing: str | None = Field(
        default=None,
        description="Quality was probed but its scores cannot be read back yet (why).",
    )
    ttft: tuple[SlotWindow, SlotWindow] | None = Field(
        default=None,
        description="Time to first token of candidate and champion (streamed chat only): "
        "samples and percentiles, from the model servers' own histograms.",
    )
    traffic_missing: str | None = Field(
        default=None,
        description="The source has no traffic series for a slot (why): the traffic "
        "checks cannot be judged, which is not the same as zero requests.",
    )


def judge(obs: WindowObservations, opts: CanaryOptions, *, final: bool) -> tuple[CheckResult, ...]:
    """Check results for the window so far. A check fails early only when more data
    cannot change the outcome; latency is judged at the end of the window (``final``)."""
    checks: list[CheckResult] = []
    if obs.candidate_down:
        checks.append(CheckResult(name="health", passed=False, detail=obs.candidate_down))
    else:
        checks.append(CheckResult(name="health", passed=True))
    if obs.traffic_missing is not None:
        checks.append(
            CheckResult(
                name="success-rate",
                passed=None,
                detail=obs.traffic_missing,
                inconclusive=final,
            )
        )
    else:
        checks.extend(_traffic_checks(obs, opts, final=final))
    checks.extend(_other_checks(obs, opts, final=final))
    return tuple(checks)


def _traffic_checks(
    obs: WindowObservations, opts: CanaryOptions, *, final: bool
) -> list[CheckResult]:
    """Success rate and p95/p99 latency of the candidate against the champion."""
    checks: list[CheckResult] = []
    cand = obs.candidate
    # Failures beyond what the allowed rate permits over the required sample cannot be
    # undone by more requests: fail now. Otherwise judge the rate at the window's end.
    allowed = opts.max_error_rate * max(cand.requests, opts.min_requests)
    rate = cand.failures / cand.requests if cand.requests else None
    # Too few requests to judge is missing data, like a quality score not scraped: the
    # window is inconclusive (run again, never a pass), not a verdict on the candidate.
    short = final and cand.requests < opts.min_requests
    if cand.failures > allowed:
        passed: bool | None = False
    elif final and not short:
        passed = (rate or 0.0) <= opts.max_error_rate
    else:
        passed = None
    detail = f"{cand.failures} of {cand.requests} requests failed"
    if short and passed is None:
        detail += f" (fewer than canary.min_requests={opts.min_requests} to judge)"
    checks.append(
        CheckResult(
            name="success-rate",
            passed=passed,
            observed=None if rate is None else round(1 - rate, 4),
            limit=round(1 - opts.max_error_rate, 4),
            detail=detail,
            inconclusive=short and passed is None,
        )
    )

    for q in (95, 99):
        c_ms, base_ms = cand.percentile(q), obs.champion.percentile(q)
        need = MIN_SAMPLES[q]
        if final and cand.samples < need and c_ms is not None:
            # The p99 of 20 requests is their maximum: one GC pause would fail the step.
            checks.append(
                CheckResult(
                    name=f"latency-p{q}",
                    passed=None,
                    observed=round(c_ms, 1),
                    detail=f"not judged: {cand.samples} samples, p{q} needs {need}",
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
            # No champion latency to compare with is no comparison: not a pass.
            ok = None if limit is None else c_ms <= limit
        base = "no champion requests" if base_ms is None else f"champion {base_ms:.0f} ms"
        checks.append(
            CheckResult(
                name=f"latency-p{q}",
                passed=ok,
                observed=None if c_ms is None else round(c_ms, 1),
                limit=None if limit is None else round(limit, 1),
                detail=f"candidate {'-' if c_ms is None else f'{c_ms:.0f} ms'} vs {base}",
                inconclusive=final and c_ms is not None and limit is None,
            )
        )

    return checks


def _other_checks(
    obs: WindowObservations, opts: CanaryOptions, *, final: bool
) -> list[CheckResult]:
    """Time to first token (chat) and quality."""
    checks: list[CheckResult] = []
    if obs.ttft is not None:
        checks.append(_ttft_check(obs.ttft, opts, final=final))

    if obs.quality_missing is not None:
        checks.append(
            CheckResult(
                name="quality",
                passed=None,
                detail=obs.quality_missing,
                inconclusive=final,
            )
        )
    elif obs.quality is not None and obs.quality.champion is None:
        checks.append(
            CheckResult(
                name="quality",
                passed=None,
                observed=round(obs.quality.candidate, 4),
                detail=f"{obs.quality.metric}: the champion could not be scored, so there is "
                "nothing to compare the candidate with",
                inconclusive=True,
            )
        )
    elif obs.quality is not None and (champ_score := obs.quality.champion) is not None:
        qual = obs.quality
        floor = champ_score - opts.quality_tolerance
        checks.append(
            CheckResult(
                name="quality",
                passed=qual.candidate >= floor,
                observed=round(qual.candidate, 4),
                limit=round(floor, 4),
                detail=f"{qual.metric} on {qual.items} eval items: candidate "
                f"{qual.candidate:.3f} vs champion {champ_score:.3f}",
            )
        )
    return checks


def _ttft_check(
    ttft: tuple[SlotWindow, SlotWindow], opts: CanaryOptions, *, final: bool
) -> CheckResult:
    """The candidate's p95 time to first token against the champion's, as latency is
    judged (ratio plus slack), at the window's end and with enough streamed answers."""
    cand, champ = ttft
    c_ms, base_ms = cand.p95_ms, champ.p95_ms
    need = MIN_SAMPLES[95]
    if not final:
        return CheckResult(name="ttft-p95", passed=None, observed=_r(c_ms))
    if cand.samples < need:
        # As for latency: the p95 of a handful of answers is their slowest one.
        return CheckResult(
            name="ttft-p95",
            passed=None,
            observed=_r(c_ms),
            detail=f"not judged: {cand.samples} streamed answers, p95 needs {need}",
        )
    if c_ms is None or base_ms is None or champ.samples < need:
        return CheckResult(
            name="ttft-p95",
            passed=None,
            observed=_r(c_ms),
            detail=f"no champion time to first token to compare with ({champ.samples} "
            "streamed answers)",
            inconclusive=True,
        )
    limit = base_ms * opts.max_latency_ratio + opts.latency_slack_ms
    return CheckResult(
        name="ttft-p95",
        passed=c_ms <= limit,
        observed=_r(c_ms),
        limit=_r(limit),
        detail=f"candidate {c_ms:.0f} ms vs champion {base_ms:.0f} ms (the servers' own "
        "histograms)",
    )


def _r(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 1)


def failed(checks: Sequence[CheckResult]) -> tuple[str, ...]:
    return tuple(c.name for c in checks if c.passed is False)


def inconclusive(checks: Sequence[CheckResult]) -> tuple[str, ...]:
    return tuple(c.name for c in checks if c.inconclusive)


def describe_failure(checks: Sequence[CheckResult]) -> str:
    """The failed (or inconclusive) checks, each with the candidate's query, if any."""
    return "; ".join(
        f"{c.name}: {c.detail}"
        + (" (inconclusive)" if c.inconclusive else "")
        + (f" [query: {c.queries[0]}]" if c.queries else "")
        for c in checks
        if c.passed is False or c.inconclusive
    )


# --- the window -------------------------------------------------------------------


class WindowCounter:
    """Counts one slot's requests in a window (from the router's access log)."""

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
        return SlotWindow.from_latencies(self.requests, self.failures, self.latencies)


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


def query_tags(verdicts: Sequence[StepVerdict]) -> dict[str, str]:
    """MLflow tags of the queries behind the verdicts: ``gantry.canary.metrics`` (the
    source) and ``gantry.canary.queries`` (each check's queries and observed value, per
    step, JSON; MLflow keeps 5000 characters of a tag, so the last steps come first)."""
    if not verdicts:
        return {}
    rows = [
        {"step": v.step + 1, "check": c.name, "observed": c.observed, "queries": list(c.queries)}
        for v in reversed(verdicts)
        for c in v.checks
        if c.queries
    ]
    tags = {"gantry.canary.metrics": verdicts[-1].source}
    if rows:
        text = json.dumps(rows)
        while len(text) > 5000 and rows:
            rows.pop()
            text = json.dumps(rows)
        tags["gantry.canary.queries"] = text
    return tags


def analyse_step(
    target: Target,
    prober: Prober,
    source: MetricSource,
    opts: CanaryOptions,
    cand: Slot,
    champ: Slot,
    step: int,
    weight: int,
) -> StepVerdict:
    """One analysis window at ``weight``: returns as soon as a check fails, else at the
    window's end with the final judgement. A window that ends inconclusive (data a check
    needs is missing) is run again ``opts.inconclusive_retries`` times, then fails."""
    for attempt in range(opts.inconclusive_retries + 1):
        verdict = _window(target, prober, source, opts, cand, champ, step, weight, attempt)
        missing = inconclusive(verdict.checks)
        if verdict.passed or not missing or failed(verdict.checks):
            return verdict
        if attempt < opts.inconclusive_retries:
            log.warning(
                "step %d window inconclusive (%s): running it again", step + 1, ", ".join(missing)
            )
    return verdict


def _window(
    target: Target,
    prober: Prober,
    source: MetricSource,
    opts: CanaryOptions,
    cand: Slot,
    champ: Slot,
    step: int,
    weight: int,
    attempt: int,
) -> StepVerdict:
    started, t0 = _now(), time.monotonic()
    # Quality first, inside the window: its eval-set batches would queue the small
    # requests behind them and skew the latency comparison, so the traffic checks observe
    # what comes after it (the rest of the window, at least half of it). It also warms the
    # candidate up, as live traffic would.
    quality = prober.quality(cand, champ, opts.quality_probes)
    quality_at = _now() if quality is not None else None
    source.begin(f"{step + 1}.{attempt + 1}", quality, cand, champ)
    first = target.state(cand)
    t_obs = time.monotonic()
    end = max(t0 + opts.window_s, t_obs + max(opts.window_s / 2, min_observation_s(opts)))
    synthetic = 0
    # Probes run beside the checks: a probe stuck on a dying candidate must not delay the
    # health check that rolls it back.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="canary-probe") as pool:
        while True:
            tick = time.monotonic()
            final = tick >= end
            # The candidate's state first: a crash is the most urgent thing to notice.
            down = _down(target, cand, first)
            champ_state = target.state(champ)
            if final:
                source.settle(time.time() - (tick - end))
            reading = source.read()
            obs = WindowObservations(
                candidate=reading.candidate,
                champion=reading.champion,
                quality=reading.quality,
                quality_missing=reading.quality_missing,
                ttft=reading.ttft,
                traffic_missing=reading.traffic_missing,
                candidate_down=down,
            )
            checks = tuple(
                c.model_copy(update={"queries": reading.queries.get(c.name, ())})
                for c in judge(obs, opts, final=final)
            )
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
                    finished_at=_now(),
                    passed=not failed(checks) and not (final and inconclusive(checks)),
                    checks=checks,
                    candidate_requests=obs.candidate.requests,
                    champion_requests=obs.champion.requests,
                    synthetic_requests=synthetic,
                    source=source.name,
                    quality_at=quality_at,
                    usage=source.usage() if final else {},
                )
            counted = reading.candidate_counted
            due = probes_wanted(
                opts.min_requests,
                tick - t_obs,
                end - t_obs,
                obs.candidate.requests if counted is None else counted,
            )
            for _ in range(min(due, probes_per_check(opts))):
                pool.submit(prober.synthetic, cand)
                pool.submit(prober.synthetic, champ)
                synthetic += 2
            time.sleep(max(0.0, opts.interval_s - (time.monotonic() - tick)))


def _down(target: Target, slot: Slot, first: ServerState | None = None) -> str | None:
    state = target.state(slot)
    if not state.running:
        return f"the candidate's container stopped: {state.detail}"
    if first is not None and (state.restarts, state.started_at) != (
        first.restarts,
        first.started_at,
    ):
        return (
            "the candidate's container restarted during the window "
            f"({state.restarts - first.restarts} restart(s) by the engine; it came back, but "
            "a model that crashes under canary traffic is not promoted)"
        )
    routed = target.routed(slot)
    if routed is not None and not routed.up and not routed.parked:
        return f"the router's health check sees the candidate {routed.detail}"
    return None
