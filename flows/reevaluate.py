"""Flow `reevaluate`: re-score every live champion and act on a regression (scheduled by
the `reevaluate` deployment of prefect.yaml; `gantry reevaluate` runs it by hand).

Every model is checked before the run fails: one model's regression or error never keeps
the others from being re-evaluated. The stage is :mod:`gantry.stages.reevaluate`.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from gantry.errors import ReevaluationError
from gantry.stages.reevaluate import ReevaluateOptions, ReevaluationReport
from tasks.reevaluate import reevaluate_model_task, report_task, select_task


def _run_name() -> str:
    models = flow_run.parameters.get("models")
    return f"reevaluate {', '.join(models)}" if models else "reevaluate all champions"


@flow(name="reevaluate", flow_run_name=_run_name, persist_result=False, log_prints=False)
def reevaluate(
    models: list[str] | None = None,
    rollback_on_regression: bool = False,
    max_scan_age_hours: float = 24,
    tracking_uri: str | None = None,
    endpoint_attempts: int = 3,
) -> ReevaluationReport:
    """Re-evaluate the champions of ``models`` (MLflow registered model names; empty: every
    deployed model with a `champion`) against their live deployments.

    Args:
        models: Which models; empty: all deployed champions.
        rollback_on_regression: On a regression, go back to the previous champion, as
            `gantry rollback` does.
        max_scan_age_hours: Re-scan an image whose last scan is older than this (0: always).
        tracking_uri: MLflow tracking URI, when it is not the one in the champion's spec.
        endpoint_attempts: Tries of the eval set while the live endpoint does not answer,
            before the model gets no verdict (never a regression).

    Fails (ReevaluationError, carrying the report) when any model regressed or could not
    be judged, after all of them were checked.
    """
    from gantry.stages.canary.state import now

    opts = ReevaluateOptions.of(
        models=tuple(models or ()),
        rollback_on_regression=rollback_on_regression,
        max_scan_age_hours=max_scan_age_hours,
        tracking_uri=tracking_uri,
        endpoint_attempts=endpoint_attempts,
    )
    started = now()
    results = tuple(reevaluate_model_task(t, opts) for t in select_task(opts))
    report = ReevaluationReport(started_at=started, finished_at=now(), options=opts, models=results)
    report_task(report)
    if problems := report.problems():
        raise ReevaluationError(
            f"re-evaluation found {len(problems)} problem(s):\n  " + "\n  ".join(problems),
            report=report,
            fix="the run's `reevaluation` artifact has every model's outcome; after a "
            "regression `gantry rollback MODEL` restores the previous champion",
        )
    return report
