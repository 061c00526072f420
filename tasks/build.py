"""Stage `build`, Prefect face: the task and its table artifact of the largest layers.
The stage itself is :mod:`gantry.stages.build`."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from gantry.spec import ReleaseSpec
from gantry.stages import build
from gantry.stages.build import BuildResult
from gantry.stages.weights import WeightsResult
from tasks._retry import retry_transient


def layers_table(result: BuildResult, top: int = 10) -> list[dict[str, str]]:
    """The largest layers, for the build artifact."""
    biggest = sorted(result.layers, key=lambda layer: layer.size_bytes, reverse=True)[:top]
    return [
        {"size": f"{layer.size_bytes / 2**20:.1f} MiB", "created by": layer.created_by}
        for layer in biggest
    ]


@task(name="build", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient)
def build_task(spec: ReleaseSpec, weights: WeightsResult) -> BuildResult:
    """Prefect task for stage `build`; leaves a table artifact of size and largest layers."""
    from gantry.settings import get_settings

    result = build.run(spec, weights, get_settings())
    create_table_artifact(
        key=f"{spec.name}-image-layers",
        table=layers_table(result),
        description=f"**{result.image}**: {result.size_bytes / 2**20:.1f} MiB in "
        f"{len(result.layers)} layers ({'cached' if result.cached else 'built'})",
    )
    return result
