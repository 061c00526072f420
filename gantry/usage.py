"""CPU and memory a model really used, and the limits that follow from it (pure).

The model container's limits (``smoke.cpus``, ``smoke.memory_mb``: smoke, evaluate and
the canary's servers share them) should be the observed p99 plus 20 % headroom. Stage
`evaluate` samples its container under the eval set's load
(:class:`gantry.adapters.docker_stats.UsageSampler`); :func:`recommend` turns that
:class:`UsageSummary` into a :class:`LimitsAdvice`, and :func:`check_limits` fails a
release whose memory limit is too small for what the model used::

    summary = summarize(cpu_cores=[0.8, 1.1, 0.9], memory_mb=[300, 310, 305], duration_s=3)
    advice = check_limits(summary, cpus=2.0, memory_mb=512)
    advice.recommended_memory_mb  # 384: p99 309.9 MiB x 1.2, rounded up to 16 MiB

Memory is in MiB throughout (``smoke.memory_mb`` is passed to Docker as ``<n>m``).
No Docker, no Prefect: unit-tested on numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from gantry.errors import ResourceLimitError
from gantry.scoring import percentiles

#: Headroom over the observed p99 (the seed checklist's "+ 20 %").
HEADROOM = 1.2
CPU_STEP = 0.05
MIN_CPUS = 0.1
MEMORY_STEP_MB = 16
MIN_MEMORY_MB = 64
#: Fewer samples than this say nothing about a p99: no verdict, a warning.
MIN_SAMPLES = 3
#: A working set this close to the limit means the container ran AT its limit (the kernel
#: reclaims and then OOM-kills there), so what it needs is at least what was seen.
NEAR_LIMIT = 0.95
#: A limit more than this many times the recommendation is flagged as wasteful.
OVERSIZED = 4.0


class UsageSummary(BaseModel):
    """What a container used while it was sampled. CPU in cores (1.0 = one CPU busy),
    memory as working set in MiB; None where there was nothing to measure."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: int = Field(description="Stats samples taken.")
    duration_s: float = Field(description="How long the container was sampled.")
    cpu_p50_cores: float | None = None
    cpu_p99_cores: float | None = None
    memory_p50_mb: float | None = None
    memory_p99_mb: float | None = None
    peak_memory_mb: float | None = None
    restarts: int = Field(default=0, description="RestartCount's growth while sampled.")
    missed_samples: int = Field(default=0, description="Samples that failed or found none.")
    oom_killed: bool = Field(default=False, description="The kernel OOM-killed it.")
    memory_limit_mb: float | None = Field(
        default=None, description="The cgroup's memory limit as sampled; None: unlimited."
    )

    @property
    def conclusive(self) -> bool:
        return self.samples >= MIN_SAMPLES


class LimitsAdvice(BaseModel):
    """Recommended limits (observed p99 + 20 %) next to the configured ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recommended_cpus: float | None = Field(
        description="CPU p99 x 1.2, rounded up to 0.05 (min 0.1); None: inconclusive."
    )
    recommended_memory_mb: int | None = Field(
        description="Memory p99 x 1.2, rounded up to 16 MiB (min 64); None: inconclusive."
    )
    cpus: float = Field(description="The configured limit (smoke.cpus).")
    memory_mb: int = Field(description="The configured limit (smoke.memory_mb).")
    warnings: tuple[str, ...] = ()


def summarize(
    *,
    cpu_cores: Sequence[float],
    memory_mb: Sequence[float],
    duration_s: float,
    restarts: int = 0,
    missed: int = 0,
    oom_killed: bool = False,
    memory_limit_mb: float | None = None,
) -> UsageSummary:
    """A summary of per-interval CPU rates and per-sample working sets (``samples`` is the
    number of memory samples; the CPU rates are the differences between them)."""

    def p(values: Sequence[float], q: float) -> float | None:
        return round(percentiles(values, (q,))[0], 3) if values else None

    return UsageSummary(
        samples=len(memory_mb),
        duration_s=round(duration_s, 3),
        cpu_p50_cores=p(cpu_cores, 50),
        cpu_p99_cores=p(cpu_cores, 99),
        memory_p50_mb=p(memory_mb, 50),
        memory_p99_mb=p(memory_mb, 99),
        peak_memory_mb=round(max(memory_mb), 3) if memory_mb else None,
        restarts=restarts,
        missed_samples=missed,
        oom_killed=oom_killed,
        memory_limit_mb=None if memory_limit_mb is None else round(memory_limit_mb, 3),
    )


def _round_up(value: float, step: float) -> float:
    # round() first: 0.35 * 1.2 / 0.05 is 8.400000000000002 in floats, 7.0 must stay 7.
    return math.ceil(round(value / step, 9)) * step


def recommended_cpus(p99_cores: float) -> float:
    return round(max(MIN_CPUS, _round_up(p99_cores * HEADROOM, CPU_STEP)), 2)


def recommended_memory_mb(p99_mb: float) -> int:
    return max(MIN_MEMORY_MB, int(_round_up(p99_mb * HEADROOM, MEMORY_STEP_MB)))


def recommend(summary: UsageSummary, cpus: float, memory_mb: int) -> LimitsAdvice:
    """The recommended limits and what to say about the configured ones. Never raises;
    :func:`check_limits` is the gate."""
    if not summary.conclusive or summary.cpu_p99_cores is None or summary.memory_p99_mb is None:
        return LimitsAdvice(
            recommended_cpus=None,
            recommended_memory_mb=None,
            cpus=cpus,
            memory_mb=memory_mb,
            warnings=(
                f"usage inconclusive: {summary.samples} sample(s) over {summary.duration_s:.1f}s "
                f"({summary.missed_samples} missed), at least {MIN_SAMPLES} are needed: the "
                "limits were not checked",
            ),
        )
    rec_cpus = recommended_cpus(summary.cpu_p99_cores)
    rec_mem = recommended_memory_mb(summary.memory_p99_mb)
    warnings: list[str] = []
    if summary.cpu_p99_cores >= NEAR_LIMIT * cpus:
        warnings.append(
            f"CPU p99 {summary.cpu_p99_cores:.2f} cores is at the limit smoke.cpus {cpus:g}: "
            "the model was throttled, so it would use more; the latency figures include it"
        )
    if cpus > OVERSIZED * rec_cpus:
        warnings.append(
            f"smoke.cpus {cpus:g} is over {OVERSIZED:g}x the recommended {rec_cpus:g} (p99 "
            f"{summary.cpu_p99_cores:.2f} cores + 20 %): consider `smoke.cpus: {rec_cpus:g}`"
        )
    if memory_mb > OVERSIZED * rec_mem:
        warnings.append(
            f"smoke.memory_mb {memory_mb} is over {OVERSIZED:g}x the recommended {rec_mem} "
            f"(p99 {summary.memory_p99_mb:.1f} MiB + 20 %): consider `smoke.memory_mb: "
            f"{max(rec_mem, SPEC_MIN_MEMORY_MB)}`"
        )
    if summary.restarts:
        warnings.append(f"the container restarted {summary.restarts} time(s) while sampled")
    return LimitsAdvice(
        recommended_cpus=rec_cpus,
        recommended_memory_mb=rec_mem,
        cpus=cpus,
        memory_mb=memory_mb,
        warnings=tuple(warnings),
    )


#: smoke.memory_mb's lower bound in the spec, so a suggested value is one it accepts.
SPEC_MIN_MEMORY_MB = 128


def check_limits(summary: UsageSummary, cpus: float, memory_mb: int) -> LimitsAdvice:
    """:func:`recommend`, and ResourceLimitError when ``memory_mb`` is too small for what
    the model used: it would be OOM-killed under load.

    The usage was observed under that same limit, and a working set cannot outgrow its
    cgroup's limit: a limit that is too small shows up as usage AT the limit, not over it.
    So "too small" is any of: the observed p99 over the limit (figures from elsewhere),
    the p99 at >= 95 % of it (the kernel was reclaiming to stay under; one more request
    and it kills), or an OOM kill while sampled. The figure reported is what was seen,
    and the recommendation from it is a lower bound in the last two cases. CPU never
    fails: a CPU limit throttles, it does not kill. An inconclusive summary (fewer than
    :data:`MIN_SAMPLES` samples) fails only on an OOM kill, which is evidence by itself.
    """
    advice = recommend(summary, cpus, memory_mb)
    p99 = summary.memory_p99_mb
    if summary.oom_killed:
        seen = (
            "no sample"
            if p99 is None
            else f"p99 {p99:.1f} MiB, peak {summary.peak_memory_mb:.1f} MiB"
        )
        raise ResourceLimitError(
            f"the model container was OOM-killed at its memory limit smoke.memory_mb "
            f"{memory_mb} MiB (loading the model or under the eval set's load; working set "
            f"sampled before the kill, once a second: {seen})",
            configured_mb=memory_mb,
            observed_p99_mb=p99,
            recommended_mb=advice.recommended_memory_mb,
            fix=_memory_fix(advice, memory_mb, lower_bound=True),
        )
    if not summary.conclusive or p99 is None:
        return advice
    if p99 > memory_mb or p99 >= NEAR_LIMIT * memory_mb:
        share = 100 * p99 / memory_mb
        raise ResourceLimitError(
            f"smoke.memory_mb {memory_mb} MiB is below what the model uses: its working set "
            f"under the eval set's load reached p99 {p99:.1f} MiB ({share:.0f} % of the limit; "
            f"at >= {NEAR_LIMIT:.0%} it runs at the limit and is OOM-killed under more load)",
            configured_mb=memory_mb,
            observed_p99_mb=p99,
            recommended_mb=advice.recommended_memory_mb,
            fix=_memory_fix(advice, memory_mb, lower_bound=p99 <= memory_mb),
        )
    return advice


def _memory_fix(advice: LimitsAdvice, memory_mb: int, *, lower_bound: bool) -> str:
    rec = advice.recommended_memory_mb
    if rec is None:  # an OOM kill with too few samples to recommend from
        return (
            f"raise smoke.memory_mb (at least `smoke.memory_mb: {2 * memory_mb}`) and release "
            "again; the next evaluation's p99 says how much it needs"
        )
    target = max(rec, SPEC_MIN_MEMORY_MB)
    basis = "observed p99 + 20 %, rounded up to 16 MiB"
    if lower_bound:
        basis += "; it ran at its limit, so this is a lower bound: check the next p99"
    return f"set `smoke.memory_mb: {target}` in the spec ({basis}) and release again"
