"""Stage `evaluate`: the quality and latency gate, run against the served candidate.

:func:`run` verifies the signed image and weights and serves them hardened (as in smoke);
:func:`gate_endpoint` is the same gate for an endpoint already served. Either sends the
eval set to it (``evaluate.concurrency`` requests in flight), scores it, writes one JSONL
row per item under ``<state>/releases/<id>/evaluate/``, and fails the release with
QualityGateError when the score is under ``evaluate.threshold`` or more than
``evaluate.tolerance`` below the current champion's. An endpoint that never answers raises
EndpointUnavailableError (transient) instead of a false verdict. With no
``evaluate.dataset`` the stage is skipped with a warning and the result says so.

:func:`run` also samples the container's CPU and memory (``docker stats``) from its start
(the model load's peak counts) to the end of the eval run, the load test the model gets
before release, and recommends limits from it
(observed p99 + 20 %, :mod:`gantry.usage`). After the quality gate it fails the release
with ResourceLimitError when ``smoke.memory_mb`` is below what the model used there: its
p99 working set at 95 % of the limit or more, or an OOM kill.

Here live the stage's contract (:class:`EvalResult`), its gate and its entry point
:func:`run`; the scorers and the runner are :mod:`gantry.scoring`; ``tasks/evaluate.py``
is its Prefect face (the task and its table artifact).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

import gantry
from gantry import scoring
from gantry.atomicfile import write_atomic
from gantry.errors import ConfigError, GantryError, QualityGateError
from gantry.settings import Settings
from gantry.spec import Protocol, ReleaseSpec
from gantry.stages.build import BuildResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from gantry.usage import LimitsAdvice, UsageSummary, check_limits, recommend

if TYPE_CHECKING:
    from gantry.adapters.docker_engine import DockerClient

log = logging.getLogger("gantry.evaluate")

STAGE = "evaluate"
_MATCH_MODES: dict[str, scoring.MatchMode] = {
    "exact": "exact",
    "contains": "contains",
    "regex": "regex",
}
#: Seconds between stats samples of the evaluated container (Docker 20.10 answers a
#: one-shot read on its collector's next tick, once a second, so more often gains nothing).
USAGE_INTERVAL_S = 1.0
#: Model name → metrics of its `champion` version (None: no champion yet).
ChampionMetrics = Callable[[str], dict[str, float] | None]


class EvalResult(BaseModel):
    """What the gate measured and decided. ``score`` is the gate metric's value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    skipped: bool = Field(default=False, description="No eval set was configured.")
    warning: str | None = None
    metric: str
    score: float | None = None
    top1: float | None = Field(default=None, description="Embeddings: top-1 accuracy.")
    mrr: float | None = Field(default=None, description="Embeddings: mean reciprocal rank.")
    accuracy: float | None = Field(default=None, description="Chat: share of matching answers.")
    n: int = Field(default=0, description="Items in the eval set.")
    requests: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    ttft_p50_ms: float | None = Field(default=None, description="Chat: time to first token.")
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    throughput_rps: float | None = None
    threshold: float
    tolerance: float
    champion_score: float | None = None
    passed: bool
    dataset: str | None = None
    dataset_sha256: str | None = None
    results_path: str | None = None
    usage: UsageSummary | None = Field(
        default=None,
        description="CPU and memory the container used under the eval set (None: not "
        "sampled, e.g. an endpoint evaluated in place, or a record from before sampling).",
    )
    limits: LimitsAdvice | None = Field(
        default=None, description="Limits recommended from `usage` (p99 + 20 %)."
    )

    def metrics(self) -> dict[str, float]:
        """The numbers to log to MLflow, keyed as a later champion lookup reads them
        (the gate metric under its own name, e.g. ``top1``)."""
        out: dict[str, float] = {}
        for key in (
            "top1",
            "mrr",
            "accuracy",
            "latency_p50_ms",
            "latency_p95_ms",
            "latency_p99_ms",
            "ttft_p50_ms",
            "ttft_p95_ms",
            "ttft_p99_ms",
            "throughput_rps",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        if self.score is not None:
            out[self.metric] = self.score
        # Named as stage `register` flattens the result (``eval.usage.cpu_p99_cores``), so
        # a release run and a re-evaluation log the figures under one name.
        if self.usage is not None:
            for key in ("cpu_p50_cores", "cpu_p99_cores", "memory_p50_mb", "memory_p99_mb"):
                if (value := getattr(self.usage, key)) is not None:
                    out[f"usage.{key}"] = float(value)
        if self.limits is not None:
            for key in ("recommended_cpus", "recommended_memory_mb"):
                if (value := getattr(self.limits, key)) is not None:
                    out[f"limits.{key}"] = float(value)
        return out


def resolve_dataset(dataset: str) -> Path:
    """The eval set named by the spec: absolute, else under CWD or the project root."""
    p = Path(dataset)
    if p.is_absolute():
        return p
    root = Path(gantry.__file__).resolve().parent.parent
    for cand in (Path.cwd() / p, root / p):
        if cand.is_file():
            return cand.resolve()
    return (root / p).resolve()  # the loader reports it missing, with the fix


def _check_metric(spec: ReleaseSpec) -> None:
    allowed = (
        scoring.EMBEDDING_METRICS
        if spec.runtime.protocol is Protocol.OPENAI_EMBEDDINGS
        else scoring.CHAT_METRICS
    )
    if spec.evaluate.metric not in allowed:
        raise ConfigError(
            f"evaluate.metric {spec.evaluate.metric!r} does not apply to protocol "
            f"{spec.runtime.protocol.value}",
            fix=f"set evaluate.metric to one of {', '.join(allowed)}",
        )


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _champion_score(spec: ReleaseSpec, champion_metrics: ChampionMetrics | None) -> float | None:
    if champion_metrics is None:
        return None
    from gantry.stages.register import model_name_for

    model_name = model_name_for(spec)
    metrics = champion_metrics(model_name)
    if not metrics or spec.evaluate.metric not in metrics:
        if metrics is not None:
            log.warning(
                "the champion of %s has no %r metric; comparing with the threshold only",
                model_name,
                spec.evaluate.metric,
            )
        return None
    return float(metrics[spec.evaluate.metric])


def gate_endpoint(
    spec: ReleaseSpec,
    base_url: str,
    settings: Settings,
    *,
    champion_metrics: ChampionMetrics | None = None,
    attempts: int | None = None,
    backoff_s: float | None = None,
) -> EvalResult:
    """Measure the endpoint at ``base_url`` (e.g. ``http://127.0.0.1:8080``) and gate it:
    :func:`measure`, then :func:`check_gate`.

    Raises QualityGateError when the gate fails, EndpointUnavailableError when the endpoint
    does not answer after ``attempts`` tries (default: ``evaluate.request_attempts``, the
    backoff doubling from ``evaluate.request_backoff_s``), EvalSetError for a bad eval set.
    """
    result = measure(
        spec,
        base_url,
        settings,
        champion_metrics=champion_metrics,
        attempts=attempts,
        backoff_s=backoff_s,
    )
    check_gate(spec, result)
    return result


def check_gate(spec: ReleaseSpec, result: EvalResult) -> None:
    """Raise QualityGateError, with both scores and the fix, if ``result`` did not pass."""
    if result.passed or result.score is None:
        return
    verdict = scoring.gate(result.score, spec.evaluate, result.champion_score)
    raise QualityGateError(
        f"quality gate failed for {spec.name}: {verdict.message} (per-item results: "
        f"{result.results_path})",
        score=result.score,
        threshold=result.threshold,
        champion_score=result.champion_score,
        fix="improve the candidate (or pick another revision), or, if the drop is "
        "intended, lower evaluate.threshold or raise evaluate.tolerance in the spec",
    )


def measure(
    spec: ReleaseSpec,
    base_url: str,
    settings: Settings,
    *,
    champion_metrics: ChampionMetrics | None = None,
    attempts: int | None = None,
    backoff_s: float | None = None,
    headers: Mapping[str, str] | None = None,
    results_path: Path | None = None,
) -> EvalResult:
    """Run the eval set against ``base_url`` and decide the gate, without raising on a
    failed gate (``passed`` says); see :func:`gate_endpoint`.

    ``headers`` go with every request (the re-evaluation routes them to the champion's
    router slot); ``results_path`` is where the per-item rows go (default: the release's
    ``evaluate/results.jsonl``)."""
    opts = spec.evaluate
    if opts.dataset is None:
        warning = "evaluate.dataset is not set: the quality gate was skipped"
        log.warning("%s; set it to gate releases on quality", warning)
        return EvalResult(
            skipped=True,
            warning=warning,
            metric=opts.metric,
            threshold=opts.threshold,
            tolerance=opts.tolerance,
            passed=True,
        )
    _check_metric(spec)
    path = resolve_dataset(opts.dataset)
    cfg = scoring.RunnerConfig(
        model=spec.runtime.served_model_name or spec.name,
        concurrency=opts.concurrency,
        timeout_s=opts.timeout_s,
        attempts=opts.request_attempts if attempts is None else attempts,
        backoff_s=opts.request_backoff_s if backoff_s is None else backoff_s,
        headers=dict(headers or {}),
        max_tokens=opts.max_tokens,
    )
    chat = spec.runtime.protocol is Protocol.OPENAI_CHAT
    n: int
    if chat:
        chat_items = scoring.load_chat_set(path)
        n = len(chat_items)
        # _check_metric made sure the gate metric is a match mode.
        default = _MATCH_MODES[opts.metric]
        outcome = scoring.run_sync(scoring.run_chat(base_url, chat_items, cfg, default))
        score = outcome.scores["accuracy"]
    else:
        items = scoring.load_retrieval_set(path)
        n = len(items)
        outcome = scoring.run_sync(scoring.run_embeddings(base_url, items, cfg))
        score = outcome.scores[opts.metric]

    results = results_path or settings.releases_dir / spec.release_id / "evaluate" / "results.jsonl"
    _write_rows(results, outcome.rows)
    champion = _champion_score(spec, champion_metrics)
    verdict = scoring.gate(score, opts, champion)
    lat = scoring.percentiles(outcome.latencies_ms)
    ttft = scoring.percentiles(outcome.ttfts_ms) if chat else [None, None, None]
    result = EvalResult(
        metric=opts.metric,
        score=score,
        top1=outcome.scores.get("top1"),
        mrr=outcome.scores.get("mrr"),
        accuracy=outcome.scores.get("accuracy"),
        n=n,
        requests=len(outcome.latencies_ms),
        latency_p50_ms=round(lat[0], 3),
        latency_p95_ms=round(lat[1], 3),
        latency_p99_ms=round(lat[2], 3),
        ttft_p50_ms=None if ttft[0] is None else round(ttft[0], 3),
        ttft_p95_ms=None if ttft[1] is None else round(ttft[1], 3),
        ttft_p99_ms=None if ttft[2] is None else round(ttft[2], 3),
        throughput_rps=round(outcome.throughput_rps, 3),
        threshold=opts.threshold,
        tolerance=opts.tolerance,
        champion_score=champion,
        passed=verdict.passed,
        dataset=str(path),
        dataset_sha256=scoring.file_sha256(path),
        results_path=str(results),
    )
    log.info("evaluate: %s; p95 %.1f ms over %d requests", verdict.message, lat[1], result.requests)
    return result


def dataset_sha256(spec: ReleaseSpec) -> str | None:
    """sha256 of the spec's eval set; None without one, or when the file is missing (the
    evaluation itself names that)."""
    if spec.evaluate.dataset is None:
        return None
    path = resolve_dataset(spec.evaluate.dataset)
    return scoring.file_sha256(path) if path.is_file() else None


def reuse_key(
    spec: ReleaseSpec,
    settings: Settings,
    served: str,
    *,
    earlier: EvalResult | None,
    store_unchanged: bool,
) -> str | None:
    """What an earlier evaluation must have been measured on to be re-used: the served
    image and weights, the eval set's content and the champion's score now (a new champion
    or an edited eval set makes the old verdict say nothing). None when the champion's
    score cannot be read now (the stage then runs, and meets that error itself).

    With the tracking store unchanged since this release last succeeded, the champion is
    the one ``earlier`` was compared with, so MLflow is not opened.
    """
    if spec.evaluate.dataset is None:
        return f"{served} eval-set:none"
    sha = dataset_sha256(spec)
    if sha is None:
        return None
    if store_unchanged and earlier is not None:
        champion = earlier.champion_score
    else:
        try:
            champion = _champion_score(spec, mlflow_champion_metrics(spec, settings))
        except GantryError as exc:
            log.info("evaluate: the champion's score cannot be read now (%s)", exc.message)
            return None
    # A chat answer's length bound changes what is scored (a cut answer may miss the fact).
    bound = (
        f" max-tokens:{spec.evaluate.max_tokens}"
        if spec.runtime.protocol is Protocol.OPENAI_CHAT
        else ""
    )
    return (
        f"{served} eval-set:{sha}{bound} champion:{'none' if champion is None else repr(champion)}"
    )


def mlflow_champion_metrics(spec: ReleaseSpec, settings: Settings) -> ChampionMetrics:
    """The champion's eval metrics from MLflow (stage `register` logs them as `eval.*`)."""
    from gantry.stages.register import open_registry

    def lookup(model_name: str) -> dict[str, float] | None:
        metrics = open_registry(spec, settings).champion_metrics(model_name)
        if not metrics:
            return None
        return {k.removeprefix("eval."): v for k, v in metrics.items() if k.startswith("eval.")}

    return lookup


def run(
    spec: ReleaseSpec,
    build: BuildResult,
    weights: WeightsResult,
    sign: SignResult,
    settings: Settings,
    *,
    champion_metrics: ChampionMetrics | None = None,
    client: DockerClient | None = None,
    on_measured: Callable[[EvalResult], None] | None = None,
) -> EvalResult:
    """Stage `evaluate` in a release: verify, serve the signed image hardened (as in smoke),
    run the eval set through it while sampling its CPU and memory, compare with the
    champion, check the limits, always remove it.

    ``champion_metrics`` defaults to the champion in the spec's MLflow registry
    (:func:`mlflow_champion_metrics`). ``on_measured`` is handed the result before the
    gates decide (the Prefect task leaves its artifact there: a failed gate is when it
    matters most). Raises QualityGateError when the quality gate fails (see
    :func:`gate_endpoint`), then ResourceLimitError when ``smoke.memory_mb`` is too small
    for the observed usage (see :func:`gantry.usage.check_limits`), also when the
    container was OOM-killed while loading the model or mid-run (which the eval run itself
    would see as an endpoint gone, a transient error).
    """
    from gantry.adapters import containers
    from gantry.adapters.docker_engine import connect
    from gantry.adapters.docker_stats import UsageSampler
    from gantry.stages.smoke import start_runtime, verify_inputs

    if spec.evaluate.dataset is None:
        return _gated(spec, measure(spec, "", settings), on_measured)
    verify_inputs(build, weights, sign)
    own_client = client is None
    client = client or connect(settings.docker_timeout_s)
    try:
        containers.remove_leftovers(client, spec.release_id, STAGE)
        gpus = containers.resolve_gpus(client.info(), spec.smoke.accelerator, spec.smoke.gpus)
        with start_runtime(client, spec, build, weights, gpus, STAGE) as running:
            failure: GantryError | None = None
            # Sampled from the start: the model load's peak counts (a limit under it kills
            # every start), then the eval set's load.
            with UsageSampler(client, running.id, USAGE_INTERVAL_S) as sampler:
                try:
                    containers.wait_healthy(
                        running, spec.runtime.health_path, spec.smoke.deadline_s
                    )
                    if champion_metrics is None:
                        champion_metrics = mlflow_champion_metrics(spec, settings)
                    result = measure(
                        spec, running.base_url, settings, champion_metrics=champion_metrics
                    )
                except GantryError as exc:
                    failure = exc
            usage = sampler.summary()
            if failure is not None:
                if usage.oom_killed:
                    # A start that died, or an endpoint that vanished (transient, to the
                    # eval run): the engine says why, and retrying cannot help.
                    check_limits(usage, spec.smoke.cpus, spec.smoke.memory_mb)
                raise failure
            result = with_usage(spec, result, usage)
            return _gated(spec, result, on_measured)
    finally:
        if own_client:
            client.close()


def with_usage(spec: ReleaseSpec, result: EvalResult, usage: UsageSummary) -> EvalResult:
    """``result`` with the sampled usage and the limits recommended from it (logged)."""
    limits = recommend(usage, spec.smoke.cpus, spec.smoke.memory_mb)
    if limits.recommended_cpus is not None:
        log.info(
            "evaluate: used CPU p50 %.2f / p99 %.2f cores, memory p50 %.0f / p99 %.0f MiB over "
            "%d samples: recommended smoke.cpus %g (configured %g), smoke.memory_mb %d "
            "(configured %d)",
            usage.cpu_p50_cores or 0.0,
            usage.cpu_p99_cores or 0.0,
            usage.memory_p50_mb or 0.0,
            usage.memory_p99_mb or 0.0,
            usage.samples,
            limits.recommended_cpus,
            spec.smoke.cpus,
            limits.recommended_memory_mb or 0,
            spec.smoke.memory_mb,
        )
    for warning in limits.warnings:
        log.warning("evaluate: %s", warning)
    return result.model_copy(update={"usage": usage, "limits": limits})


def _gated(
    spec: ReleaseSpec, result: EvalResult, on_measured: Callable[[EvalResult], None] | None
) -> EvalResult:
    if on_measured is not None:
        on_measured(result)
    check_gate(spec, result)
    if result.usage is not None:
        check_limits(result.usage, spec.smoke.cpus, spec.smoke.memory_mb)
    return result
