"""Flow `reevaluate`'s tasks: select the champions, re-evaluate each (Prefect events, the
rollback with its events), and the report's table artifact. The stage itself is
:mod:`gantry.stages.reevaluate`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from gantry.stages.canary.rollback import RollbackResult, rollback_model
from gantry.stages.reevaluate import (
    DeployedModel,
    ModelReevaluation,
    ReevalHooks,
    ReevaluateOptions,
    ReevaluationReport,
    reevaluate_model,
    select_targets,
)
from tasks._retry import retry_transient


def report_table(report: ReevaluationReport) -> list[dict[str, str]]:
    """One row per model: what the Prefect UI shows of a re-evaluation."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = []
    for m in report.models:
        scan = m.scan
        rows.append(
            {
                "model": m.model,
                "version": m.version or "-",
                "verdict": m.verdict,
                "metric": m.metric or "-",
                "score": num(m.score),
                "accepted": num(m.baseline),
                "action": m.action if not m.action_detail else f"{m.action}: {m.action_detail}",
                "scan": "-"
                if scan is None
                else ("re-scanned, " + ("passed" if scan.passed else "BLOCKED"))
                if scan.rescanned
                else ("re-scan failed" if scan.error else "fresh"),
                "problems": "; ".join(m.problems)[:1000],
            }
        )
    return rows


@task(
    name="select-champions",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_transient,
)
def select_task(opts: ReevaluateOptions) -> list[DeployedModel]:
    """The deployments to re-evaluate (see :func:`select_targets`)."""
    from gantry.settings import get_settings

    return select_targets(get_settings().deployments_dir, opts.models)


@task(
    name="reevaluate-model",
    task_run_name="reevaluate {target.model}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_transient,
)
def reevaluate_model_task(target: DeployedModel, opts: ReevaluateOptions) -> ModelReevaluation:
    """One model's re-evaluation; Prefect events, and the rollback with its events.

    Not retried by Prefect: transient failures of the endpoint are retried inside
    (``endpoint_attempts``) and then become *no verdict*, which the result carries.
    """
    from prefect.runtime import flow_run

    from gantry.settings import get_settings
    from tasks.canary import prefect_hooks

    settings = get_settings()

    def event(model: str, name: str, payload: Mapping[str, Any]) -> None:
        prefect_hooks(None, model, {}).event(name, payload)

    def rollback(model: str) -> RollbackResult:
        return rollback_model(
            model, settings, tracking_uri=opts.tracking_uri, hooks=prefect_hooks(None, model, {})
        )

    run_id = flow_run.get_id()
    hooks = ReevalHooks(event=event, rollback=rollback, flow_run_id=str(run_id) if run_id else None)
    return reevaluate_model(target, settings, opts, hooks)


@task(
    name="reevaluation-report",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_transient,
)
def report_task(report: ReevaluationReport) -> None:
    """The table artifact of the run."""
    from prefect.artifacts import create_table_artifact

    problems = report.problems()
    create_table_artifact(
        key="reevaluation",
        table=report_table(report) or [{"model": "(none)", "verdict": "no champion deployed"}],
        description=f"Re-evaluation of {len(report.models)} model(s): "
        + (
            "all well"
            if not problems
            else f"**{len(problems)} problem(s)**: " + "; ".join(problems)[:1500]
        ),
    )
