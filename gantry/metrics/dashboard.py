"""The queries of a Grafana dashboard (``docs/dashboards/gantry-model.json``), so tests
and scripts can run them against Prometheus as Grafana would.

    for q in panel_queries(Path("docs/dashboards/gantry-model.json")):
        promql = instantiate(q.expr, model="minilm-demo")
        print(q.title, q.ref_id, prom.query(promql).samples)

Only the variables the dashboard uses are known: ``$model`` / ``${model}`` (the model's
MLflow name, the ``model`` label of every Gantry series) and ``$__rate_interval``. Any
other ``$variable`` left in a query is refused rather than sent to Prometheus as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gantry.errors import ConfigError

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_INTERVAL = re.compile(r"\d+(?:ms|s|m|h|d|w|y)")


class PanelQuery(BaseModel):
    """One query of one dashboard panel."""

    model_config = ConfigDict(frozen=True)

    title: str = Field(description="The panel's title.")
    ref_id: str = Field(description="The query's refId within its panel (A, B, …).")
    expr: str = Field(description="The PromQL, with the dashboard's variables unresolved.")


def _panels(panels: list[Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included (rows themselves left out)."""
    for panel in panels:
        if not isinstance(panel, dict):
            continue
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels") or [])
        else:
            yield panel


def panel_queries(path: Path) -> list[PanelQuery]:
    """The PromQL of every panel of the dashboard at ``path``, in the dashboard's order.

    A target without an ``expr`` (a query another data source would run) is refused, as
    is a file that is not a dashboard: a query the tests cannot see is a query no test
    checks.
    """
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the dashboard {path}: {exc}",
            fix="export it again from Grafana (Share → Export → Save to file)",
        ) from None
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        raise ConfigError(
            f"{path} is not a Grafana dashboard (no top-level panels list)",
            fix="export the dashboard's JSON model, not a panel or a provisioning file",
        )
    out: list[PanelQuery] = []
    for panel in _panels(dashboard["panels"]):
        title = str(panel.get("title") or f"panel {panel.get('id')}")
        for target in panel.get("targets") or []:
            expr = target.get("expr") if isinstance(target, dict) else None
            if not isinstance(expr, str) or not expr.strip():
                raise ConfigError(
                    f"panel {title!r} of {path} has a query without PromQL (expr)",
                    fix="give every query of the dashboard a Prometheus expression",
                )
            out.append(PanelQuery(title=title, ref_id=str(target.get("refId", "")), expr=expr))
    return out


def _label_value(value: str) -> str:
    """A PromQL string literal's inside (backslash and double quote escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def instantiate(expr: str, model: str, rate_interval: str = "1m") -> str:
    """``expr`` as Grafana would send it for ``model`` and ``rate_interval`` (pure).

    >>> instantiate('rate(x{model="$model"}[$__rate_interval])', "minilm")
    'rate(x{model="minilm"}[1m])'
    """
    if not _INTERVAL.fullmatch(rate_interval):
        raise ValueError(f"rate_interval {rate_interval!r} is not a duration such as 1m or 30s")
    values = {"model": _label_value(model), "__rate_interval": rate_interval}

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(
                f"the query uses ${name}, which the dashboard does not define "
                f"(known: {', '.join('$' + k for k in values)}): {expr}"
            )
        return values[name]

    return _VARIABLE.sub(substitute, expr)


__all__ = ["PanelQuery", "instantiate", "panel_queries"]
