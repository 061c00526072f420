"""Prefect face of stage `evaluate` (:mod:`gantry.stages.evaluate`): the task, its table
artifact (candidate next to champion) and its usage artifact (observed CPU and memory, the
limits they call for), left also (above all) when a gate fails."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from gantry.spec import ReleaseSpec
from gantry.stages import evaluate
from gantry.stages.build import BuildResult
from gantry.stages.evaluate import EvalResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient


def comparison_table(result: EvalResult) -> list[dict[str, str]]:
    """Candidate next to champion, for the stage's artifact."""

    def fmt(v: float | None, digits: int = 4) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    rows = [
        {
            "metric": f"{result.metric} (gate)",
            "candidate": fmt(result.score),
            "champion": fmt(result.champion_score),
            "threshold": fmt(result.threshold),
        }
    ]
    for key in ("top1", "mrr", "accuracy"):
        value = getattr(result, key)
        if value is not None and key != result.metric:
            rows.append({"metric": key, "candidate": fmt(value), "champion": "", "threshold": ""})
    for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms"):
        value = getattr(result, key)
        if value is not None:
            rows.append(
                {"metric": key, "candidate": fmt(value, 1), "champion": "", "threshold": ""}
            )
    rows.append(
        {
            "metric": "throughput_rps",
            "candidate": fmt(result.throughput_rps, 2),
            "champion": "",
            "threshold": "",
        }
    )
    return rows


def usage_markdown(result: EvalResult) -> str | None:
    """Observed usage under the eval set and the recommended limits; None: not sampled."""
    u, a = result.usage, result.limits
    if u is None or a is None:
        return None

    def f(v: float | int | None, unit: str, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f} {unit}".strip()

    lines = [
        f"**Usage under evaluation**: {u.samples} samples over {u.duration_s:.1f}s "
        f"({u.missed_samples} missed), restarts {u.restarts}"
        + (", **OOM-killed**" if u.oom_killed else ""),
        "",
        "| | p50 | p99 | recommended (p99 + 20 %) | configured |",
        "|---|---|---|---|---|",
        f"| CPU | {f(u.cpu_p50_cores, 'cores')} | {f(u.cpu_p99_cores, 'cores')} | "
        f"{f(a.recommended_cpus, '')} | smoke.cpus {a.cpus:g} |",
        f"| memory | {f(u.memory_p50_mb, 'MiB', 0)} | {f(u.memory_p99_mb, 'MiB', 0)} | "
        f"{f(a.recommended_memory_mb, '', 0)} | smoke.memory_mb {a.memory_mb} |",
    ]
    lines += ["", *(f"- warning: {w}" for w in a.warnings)] if a.warnings else []
    return "\n".join(lines)


def _report(spec: ReleaseSpec, result: EvalResult) -> None:
    if result.skipped:
        description = f"**skipped**: {result.warning}"
        table: list[dict[str, str]] = []
    else:
        description = (
            f"**{result.metric} {result.score:.4f}** on {result.n} items "
            f"({'passed' if result.passed else 'failed'}); dataset sha256 "
            f"{(result.dataset_sha256 or '')[:12]}"
        )
        table = comparison_table(result)
    create_table_artifact(key=f"{spec.name}-evaluation", table=table, description=description)
    if (usage := usage_markdown(result)) is not None:
        create_markdown_artifact(key=f"{spec.name}-usage", markdown=usage)


@task(
    name="evaluate", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient
)
def evaluate_task(
    spec: ReleaseSpec, build: BuildResult, weights: WeightsResult, sign: SignResult
) -> EvalResult:
    """Prefect task for stage `evaluate` in a release; leaves a table artifact (candidate vs
    champion in MLflow), written before the gate raises: a failed gate is when it matters
    most."""
    from gantry.settings import get_settings

    return evaluate.run(
        spec, build, weights, sign, get_settings(), on_measured=lambda r: _report(spec, r)
    )
