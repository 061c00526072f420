"""Flow `rollback`: put a model back on a known-good version at 100 % of its traffic.

Aborts a canary in progress (or one a killed run left behind), or, right after a
promotion, gives traffic and the MLflow `champion` alias back to the previous champion.
"""

from __future__ import annotations

from prefect import flow

from gantry.settings import get_settings
from gantry.stages.canary.rollback import RollbackResult, rollback_model
from tasks.canary import prefect_hooks


@flow(name="rollback", flow_run_name="rollback {model}", persist_result=False, log_prints=False)
def rollback(model: str, tracking_uri: str | None = None) -> RollbackResult:
    """Roll a model back to a known-good version at 100 % of its traffic.

    Args:
        model: The MLflow registered model name (a spec's `mlflow.model_name`, else its
            `name`), e.g. `minilm`.
        tracking_uri: The MLflow tracking store, when it is not the one in the champion's
            release spec.
    """
    return rollback_model(
        model, get_settings(), tracking_uri=tracking_uri, hooks=prefect_hooks(None, model, {})
    )
