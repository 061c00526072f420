"""Prefect face of stage `canary` (logic: :mod:`gantry.stages.canary`): the task, a
progress artifact, the verdict table, approval through ``pause_flow_run``, events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

from gantry.errors import ApprovalRejectedError, CanaryFailedError
from gantry.spec import ReleaseSpec
from gantry.stages.build import BuildResult
from gantry.stages.canary import run as canary
from gantry.stages.canary.analysis import StepVerdict, analysed_steps
from gantry.stages.canary.executor import Hooks
from gantry.stages.canary.run import CanaryResult
from gantry.stages.canary.state import CanaryStatus
from gantry.stages.register import RegisterResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient

log = logging.getLogger("gantry.canary")


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
                    "query": " | ".join(chk.queries),
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
    record: str | None = None,
) -> CanaryResult:
    """Prefect task for stage `canary`: progress artifact, verdict table, events.
    ``known_champion``, ``record``: see :func:`gantry.stages.canary.run.run`."""
    from prefect.artifacts import create_table_artifact

    from gantry.settings import get_settings

    last: dict[str, CanaryStatus] = {}
    hooks = prefect_hooks(spec, registered.model_name, last)
    try:
        result = canary.run(
            spec,
            build,
            weights,
            sign,
            registered,
            get_settings(),
            hooks=hooks,
            known_champion=known_champion,
            record=record,
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
