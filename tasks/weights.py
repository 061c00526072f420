"""Stage `weights`, Prefect face: the task, and the token lookup (env var, else a Prefect
Secret block). The stage itself is :mod:`gantry.stages.weights`."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from gantry.errors import ConfigError
from gantry.spec import HubSource
from gantry.stages import weights
from gantry.stages.weights import WeightsResult, WeightStore
from tasks._retry import retry_transient


@task(
    name="weights", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient
)
def weights_task(source: HubSource, store_root: str) -> WeightsResult:
    """Prefect task for stage `weights` (retried on transient hub errors only).

    The token is read here from the variable the spec names, never passed as a parameter,
    so it cannot end up in the flow run's recorded parameters.
    """
    token = os.environ.get(source.token_env) or None
    if token is None and source.token_secret:
        token = _secret(source.token_secret)
    from gantry.settings import get_settings

    return weights.run(
        source, WeightStore(Path(store_root)), token=token, token_hosts=get_settings().token_hosts
    )


def _secret(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()  # type: ignore[union-attr]
    except ValueError as exc:
        raise ConfigError(
            f"Prefect Secret block {name!r} could not be loaded: {exc}",
            fix="create it (`prefect block create secret`) or unset source.token_secret",
        ) from None
    return str(value)
