"""Prefect face of stage `smoke` (:mod:`gantry.stages.smoke`): the task, its summary
artifact, and the container's log as an artifact when it fails."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gantry.errors import GantryError
from gantry.spec import Protocol, ReleaseSpec
from gantry.stages import smoke
from gantry.stages.build import BuildResult
from gantry.stages.sign import SignResult
from gantry.stages.smoke import SmokeResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient


def summary_markdown(r: SmokeResult) -> str:
    p = r.probe
    probe = (
        f"{p.dimensions} dimensions, cosine similar {p.cosine_similar} > dissimilar "
        f"{p.cosine_dissimilar}"
        if p.protocol is Protocol.OPENAI_EMBEDDINGS
        else f"answer {p.answer!r}, TTFT {p.ttft_s}s"
    )
    period = "none" if r.start_period_s is None else f"{r.start_period_s:g}s"
    return "\n".join(
        [
            f"**Smoke** `{r.image}` passed",
            "",
            f"- cold start: **{r.cold_start_s:.2f}s** (start period {period}, recommended "
            f">= {r.recommended_start_period_s}s)",
            f"- accelerator: asked `{r.accelerator_requested.value}`, runs on "
            f"`{r.accelerator_used}` (provider `{r.provider}`)",
            f"- probe `{p.protocol.value}`: {probe} in {p.seconds:.2f}s",
            f"- container starts: {r.attempts}; logs: `{r.logs_path}`",
        ]
    )


@task(name="smoke", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient)
def smoke_task(
    spec: ReleaseSpec, build: BuildResult, weights: WeightsResult, sign: SignResult
) -> SmokeResult:
    """Prefect task for stage `smoke`; a summary artifact, and the logs when it fails."""
    from gantry.settings import get_settings

    settings = get_settings()
    try:
        result = smoke.run(spec, build, weights, sign, settings)
    except GantryError as exc:
        path = smoke.smoke_logs_path(settings, spec.release_id)
        if path.is_file():
            tail = "\n".join(path.read_text(encoding="utf-8").splitlines()[-200:])
            create_markdown_artifact(
                key=f"{spec.name}-smoke-logs",
                markdown=f"**Smoke failed**: {exc.message}\n\n```\n{tail}\n```",
                description=f"container log: {path}",
            )
        raise
    create_markdown_artifact(
        key=f"{spec.name}-smoke",
        markdown=summary_markdown(result),
        description=json.dumps({"cold_start_s": result.cold_start_s}),
    )
    return result
