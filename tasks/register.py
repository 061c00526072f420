"""Prefect face of stage `register` (:mod:`gantry.stages.register`): the task, the id of the
flow run it belongs to (tagged on the MLflow run and version), and a markdown artifact
linking the run and the version."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from gantry.record import record_path as release_record_path
from gantry.spec import ReleaseSpec
from gantry.stages import register
from gantry.stages.build import BuildResult
from gantry.stages.register import RegisterResult
from gantry.stages.scan import ScanResult
from gantry.stages.sign import SignResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.get_id()
    except Exception:  # outside any flow, or an older runtime without it
        return None
    return str(run_id) if run_id else None


def summary_markdown(result: RegisterResult) -> str:
    """Links to the run and the version (a server's UI), or how to open a SQLite store."""
    uri = result.tracking_uri
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        run = f"[{result.run_id}]({base}/#/experiments/{result.experiment_id}/runs/{result.run_id})"
        version = (
            f"[{result.model_name} v{result.version}]"
            f"({base}/#/models/{result.model_name}/versions/{result.version})"
        )
        how = ""
    else:
        run, version = f"`{result.run_id}`", f"`{result.model_name}` v{result.version}"
        how = f"\nBrowse it with `mlflow ui --backend-store-uri {uri}`.\n"
    state = "already registered (re-run)" if result.cached else "registered"
    return (
        f"## MLflow: {version} {state}\n\n"
        f"- run: {run} (experiment {result.experiment_id})\n"
        f"- source: `{result.source}`\n"
        f"- aliases: {', '.join(f'`{a}`' for a in result.aliases) or '(none)'}\n"
        f"- image: `{result.tags.get('gantry.image_ref', '?')}`\n"
        f"- tracking store: `{uri}`\n{how}"
    )


@task(
    name="register", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient
)
def register_task(
    spec: ReleaseSpec,
    weights: WeightsResult,
    build: BuildResult,
    scan: ScanResult,
    sign: SignResult,
    evaluation: BaseModel | None = None,
    smoke: BaseModel | None = None,
) -> RegisterResult:
    """Prefect task for stage `register`; leaves a markdown artifact linking run and version."""
    from gantry.settings import get_settings

    settings = get_settings()
    record = release_record_path(settings.releases_dir, spec.release_id)
    result = register.run(
        spec,
        spec.release_id,
        weights,
        build,
        scan,
        sign,
        evaluation,
        smoke,
        record if record.is_file() else None,
        settings,
        flow_run_id=_flow_run_id(),
    )
    create_markdown_artifact(
        key=f"{spec.name}-mlflow",
        markdown=summary_markdown(result),
        description=f"MLflow run and model version of release {spec.release_id}",
    )
    return result
