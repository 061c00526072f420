"""Limits from observed usage (gantry.usage): percentiles, rounding up, the memory gate and
its message, the 4x warnings, and a summary too short to say anything."""

from __future__ import annotations

import json

import pytest

from gantry.errors import PermanentError, ResourceLimitError
from gantry.spec import SmokeOptions
from gantry.stages.evaluate import EvalResult
from gantry.stages.register import numeric_fields
from gantry.usage import (
    SPEC_MIN_MEMORY_MB,
    UsageSummary,
    check_limits,
    recommend,
    recommended_cpus,
    recommended_memory_mb,
    summarize,
)

pytestmark = pytest.mark.unit


def _summary(
    cpu_p99: float = 0.5, mem_p99: float = 300.0, samples: int = 30, **kw: object
) -> UsageSummary:
    return UsageSummary.model_validate(
        {
            "samples": samples,
            "duration_s": float(samples),
            "cpu_p50_cores": cpu_p99 / 2,
            "cpu_p99_cores": cpu_p99,
            "memory_p50_mb": mem_p99 - 10,
            "memory_p99_mb": mem_p99,
            "peak_memory_mb": mem_p99 + 1,
            **kw,
        }
    )


def test_summarize_percentiles_and_peak() -> None:
    mem = [float(v) for v in range(100, 201)]  # 101 samples: p50 150, p99 199
    cpu = [0.1] * 50 + [1.0] * 50
    s = summarize(cpu_cores=cpu, memory_mb=mem, duration_s=100.0004, restarts=1, missed=2)
    assert (s.samples, s.duration_s, s.restarts, s.missed_samples) == (101, 100.0, 1, 2)
    assert s.memory_p50_mb == 150.0 and s.memory_p99_mb == 199.0 and s.peak_memory_mb == 200.0
    assert s.cpu_p50_cores == pytest.approx(0.55) and s.cpu_p99_cores == 1.0
    empty = summarize(cpu_cores=[], memory_mb=[], duration_s=0.5)
    assert empty.samples == 0 and empty.cpu_p99_cores is None and empty.peak_memory_mb is None


@pytest.mark.parametrize(
    ("p99", "expected"),
    [
        (0.0, 0.1),  # the minimum
        (0.05, 0.1),
        (0.25, 0.3),  # 0.3 exactly: not bumped to 0.35 by float noise
        (0.35, 0.45),  # 0.42 -> 0.45
        (0.5, 0.6),
        (1.0, 1.2),
        (1.71, 2.1),  # 2.052 -> 2.1
    ],
)
def test_cpus_round_up_to_a_twentieth(p99: float, expected: float) -> None:
    assert recommended_cpus(p99) == expected


@pytest.mark.parametrize(
    ("p99", "expected"),
    [(0.0, 64), (40.0, 64), (160.0, 192), (161.0, 208), (300.0, 368), (1000.0, 1200)],
)
def test_memory_rounds_up_to_16_mib(p99: float, expected: int) -> None:
    assert recommended_memory_mb(p99) == expected
    assert expected % 16 == 0 and expected >= p99 * 1.2


def test_recommend_within_limits_has_no_warning() -> None:
    advice = check_limits(_summary(cpu_p99=0.5, mem_p99=300.0), cpus=1.0, memory_mb=512)
    assert (advice.recommended_cpus, advice.recommended_memory_mb) == (0.6, 368)
    assert (advice.cpus, advice.memory_mb) == (1.0, 512)
    assert advice.warnings == ()


def test_memory_limit_below_p99_fails_with_both_figures_and_the_fix() -> None:
    with pytest.raises(ResourceLimitError) as info:
        check_limits(_summary(mem_p99=300.0), cpus=1.0, memory_mb=256)
    err = info.value
    assert isinstance(err, PermanentError)
    assert (err.configured_mb, err.observed_p99_mb, err.recommended_mb) == (256, 300.0, 368)
    text = str(err)
    assert "smoke.memory_mb 256 MiB" in text and "p99 300.0 MiB" in text
    assert "fix: set `smoke.memory_mb: 368`" in text


def test_p99_at_the_limit_is_a_limit_too_small() -> None:
    """Observed under that very limit, usage cannot exceed it: at >= 95 % it ran at it."""
    with pytest.raises(ResourceLimitError) as info:
        check_limits(_summary(mem_p99=250.0), cpus=1.0, memory_mb=256)
    text = str(info.value)
    assert "p99 250.0 MiB (98 % of the limit" in text
    assert "smoke.memory_mb: 304" in text and "lower bound" in text
    # Just under 95 %: passes.
    assert check_limits(_summary(mem_p99=243.0), cpus=1.0, memory_mb=256).warnings == ()


def test_oom_kill_fails_even_when_inconclusive() -> None:
    s = _summary(mem_p99=250.0, samples=1, oom_killed=True)
    with pytest.raises(ResourceLimitError, match="OOM-killed") as info:
        check_limits(s, cpus=1.0, memory_mb=256)
    assert "smoke.memory_mb" in str(info.value) and "250.0 MiB" in str(info.value)
    none = summarize(cpu_cores=[], memory_mb=[], duration_s=1, oom_killed=True)
    with pytest.raises(ResourceLimitError, match="at least `smoke.memory_mb: 512`"):
        check_limits(none, cpus=1.0, memory_mb=256)


def test_limits_over_four_times_the_recommendation_warn() -> None:
    advice = check_limits(_summary(cpu_p99=0.2, mem_p99=100.0), cpus=2.0, memory_mb=2048)
    assert (advice.recommended_cpus, advice.recommended_memory_mb) == (0.25, 128)
    cpu_warning, mem_warning = advice.warnings
    assert "smoke.cpus 2 is over 4x the recommended 0.25" in cpu_warning
    assert "`smoke.cpus: 0.25`" in cpu_warning
    assert "smoke.memory_mb 2048 is over 4x the recommended 128" in mem_warning
    # Exactly 4x is not over.
    assert recommend(_summary(cpu_p99=0.2, mem_p99=100.0), 1.0, 512).warnings == ()


def test_memory_suggestion_stays_within_the_spec() -> None:
    assert SmokeOptions.model_fields["memory_mb"].metadata[0].ge == SPEC_MIN_MEMORY_MB
    advice = recommend(_summary(mem_p99=30.0), 1.0, 2048)
    assert advice.recommended_memory_mb == 64
    assert "`smoke.memory_mb: 128`" in advice.warnings[-1]


def test_cpu_at_the_limit_warns_that_it_was_throttled() -> None:
    advice = check_limits(_summary(cpu_p99=0.98), cpus=1.0, memory_mb=512)
    assert advice.recommended_cpus == 1.2
    assert any("throttled" in w for w in advice.warnings)


@pytest.mark.parametrize("samples", [0, 1, 2])
def test_too_few_samples_is_inconclusive_never_a_pass(samples: int) -> None:
    s = _summary(mem_p99=9999.0, samples=samples)  # would fail if it were judged
    advice = check_limits(s, cpus=1.0, memory_mb=256)
    assert advice.recommended_cpus is None and advice.recommended_memory_mb is None
    (warning,) = advice.warnings
    assert warning.startswith("usage inconclusive") and "not checked" in warning


def test_restarts_are_warned_about() -> None:
    advice = recommend(_summary(restarts=2), 1.0, 512)
    assert any("restarted 2 time(s)" in w for w in advice.warnings)


# --- the evaluate stage's result, its artifact and what reaches MLflow -------------------


def _eval_result(**kw: object) -> EvalResult:
    return EvalResult.model_validate(
        {"metric": "top1", "score": 0.95, "threshold": 0.8, "tolerance": 0.02, "passed": True} | kw
    )


def test_eval_result_carries_usage_into_metrics_and_the_record() -> None:
    usage = _summary(cpu_p99=0.5, mem_p99=300.0)
    r = _eval_result(usage=usage, limits=recommend(usage, 2.0, 2048))
    m = r.metrics()
    assert m["usage.cpu_p50_cores"] == 0.25 and m["usage.cpu_p99_cores"] == 0.5
    assert m["usage.memory_p50_mb"] == 290.0 and m["usage.memory_p99_mb"] == 300.0
    assert (m["limits.recommended_cpus"], m["limits.recommended_memory_mb"]) == (0.6, 368.0)
    # A cached result is read back from the record's JSON with its figures.
    again = EvalResult.model_validate(json.loads(r.model_dump_json()))
    assert again == r and again.usage == usage
    # Stage `register` logs every number of the result to MLflow under eval.*.
    logged = numeric_fields(r, "eval")
    assert logged["eval.usage.cpu_p99_cores"] == 0.5
    assert logged["eval.usage.memory_p99_mb"] == 300.0
    assert logged["eval.limits.recommended_cpus"] == 0.6
    assert logged["eval.limits.recommended_memory_mb"] == 368.0
    # A re-evaluation logs metrics() under eval.*: the same names as the release run.
    assert {f"eval.{k}": v for k, v in m.items() if "." in k}.items() <= logged.items()


def test_a_record_from_before_sampling_still_loads() -> None:
    old = json.loads(_eval_result().model_dump_json(exclude={"usage", "limits"}))
    assert "usage" not in old
    r = EvalResult.model_validate(old)
    assert r.usage is None and r.limits is None
    assert not any(k.startswith(("usage_", "recommended_")) for k in r.metrics())


def test_usage_artifact() -> None:
    from tasks.evaluate import usage_markdown

    assert usage_markdown(_eval_result()) is None
    usage = _summary(cpu_p99=0.2, mem_p99=100.0)
    md = usage_markdown(_eval_result(usage=usage, limits=recommend(usage, 2.0, 2048)))
    assert md is not None
    assert "| CPU | 0.10 cores | 0.20 cores | 0.25 | smoke.cpus 2 |" in md
    assert "| memory | 90 MiB | 100 MiB | 128 | smoke.memory_mb 2048 |" in md
    assert md.count("- warning: ") == 2
