"""The Grafana dashboard docs/dashboards/gantry-model.json: importable JSON, one model per
view, every query valid PromQL (Prometheus's own parser, through promtool) over the series
Gantry exports; and the helpers that read and instantiate its queries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gantry.errors import ConfigError
from gantry.metrics.dashboard import PanelQuery, instantiate, panel_queries
from gantry.proc import run, which
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

DASHBOARD = REPO_ROOT / "docs" / "dashboards" / "gantry-model.json"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: What the exporter (job gantry-exporter), the routers' HAProxy exporter and the llama.cpp
#: runtime (job gantry-deployments) expose, and only that.
KNOWN_SERIES = {
    "gantry_router_requests_total",
    "gantry_router_request_duration_seconds_bucket",
    "gantry_canary_quality_score",
    "gantry_container_cpu_seconds_total",
    "gantry_container_cpu_limit_cores",
    "gantry_container_memory_working_set_bytes",
    "gantry_container_memory_limit_bytes",
    "gantry_container_restarts",
    "gantry_runtime_ttft_seconds_bucket",
    "haproxy_server_weight",
}
_SERIES = re.compile(r"\b((?:gantry|haproxy)_\w+)(\{[^}]*\})?")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def queries() -> list[PanelQuery]:
    return panel_queries(DASHBOARD)


def _leaf_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.extend(p.get("panels") or [] if p["type"] == "row" else [p])
    return out


# --- the dashboard -----------------------------------------------------------------------


def test_is_an_importable_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "gantry-model" and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"] == DS
    assert model["definition"] == "label_values(gantry_router_requests_total, model)"
    assert model["query"]["query"] == model["definition"]
    assert not model["multi"] and not model["includeAll"]  # queries match model="$model"


def test_panels_are_laid_out_without_overlap(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    ids = []
    for p in dashboard["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_prometheus_variable(dashboard: dict[str, Any]) -> None:
    panels = _leaf_panels(dashboard)
    assert [p["title"] for p in panels] == [
        "Request rate by version",
        "Error rate by version",
        "Latency p50 / p95 / p99 by version (router)",
        "Time to first token (all versions)",
        "TTFT p95 by version",
        "Canary weight per slot",
        "Canary quality score per window",
        "CPU used vs CPU limit",
        "Memory working set vs memory limit",
        "Container restarts",
    ]
    for p in panels:
        assert p["targets"], f"{p['title']} has no query"
        assert p["datasource"] == DS, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip(), p["title"]


def test_the_ttft_heatmap_reads_the_buckets_as_a_heatmap(dashboard: dict[str, Any]) -> None:
    (heatmap,) = [p for p in _leaf_panels(dashboard) if p["type"] == "heatmap"]
    (target,) = heatmap["targets"]
    assert "gantry_runtime_ttft_seconds_bucket" in target["expr"]
    assert target["format"] == "heatmap" and target["legendFormat"] == "{{le}}"
    assert heatmap["options"]["calculate"] is False


def test_panel_queries_lists_every_query(queries: list[PanelQuery]) -> None:
    assert len(queries) == 14
    assert {(q.title, q.ref_id) for q in queries} >= {
        ("Latency p50 / p95 / p99 by version (router)", "C"),
        ("CPU used vs CPU limit", "B"),
        ("Memory working set vs memory limit", "B"),
    }


def test_every_query_filters_by_model_and_uses_the_rate_interval(
    queries: list[PanelQuery],
) -> None:
    for q in queries:
        series = _SERIES.findall(q.expr)
        assert series, q
        for name, matchers in series:
            assert name in KNOWN_SERIES, f"{q.title}: {name} is not a series Gantry exports"
            assert 'model="$model"' in matchers, f"{q.title}: {name} is not filtered by model"
            assert "job=" in matchers, f"{q.title}: {name} does not name its scrape job"
        for window in re.findall(r"\[([^\]]*)\]", q.expr):
            assert window == "$__rate_interval", f"{q.title}: range [{window}]"


def _check_promql(tmp_path: Path, exprs: list[str]) -> str:
    """promtool's verdict on ``exprs`` as recording rules: Prometheus's own parser, no
    server needed. Returns its output; raises nothing, the caller reads the exit code."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool = which("promtool", env_var=None, install_hint="run `make system-deps`")
    done = run([promtool, "check", "rules", path], timeout_s=60, check=False)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def test_every_query_is_valid_promql(queries: list[PanelQuery], tmp_path: Path) -> None:
    exprs = [instantiate(q.expr, 'odd "model"\\name', "1m") for q in queries]
    verdict = _check_promql(tmp_path, exprs)
    assert verdict.startswith("rc=0") and f"SUCCESS: {len(exprs)} rules found" in verdict, verdict


def test_the_promql_check_catches_a_broken_query(tmp_path: Path) -> None:
    verdict = _check_promql(tmp_path, ['sum by (le (rate(x{model="m"}[1m]))'])
    assert verdict.startswith("rc=1") and "parse error" in verdict, verdict


# --- panel_queries -----------------------------------------------------------------------


def test_panel_queries_reads_collapsed_rows_and_skips_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "panels": [
                    {"type": "row", "title": "r", "collapsed": True, "panels": [
                        {"type": "timeseries", "title": "inner",
                         "targets": [{"refId": "A", "expr": "a"}]},
                    ]},
                    {"type": "stat", "title": "top", "targets": [
                        {"refId": "A", "expr": "b"}, {"refId": "B", "expr": "c"}
                    ]},
                    {"type": "text", "title": "notes"},
                ]
            }
        )
    )  # fmt: skip
    assert panel_queries(path) == [
        PanelQuery(title="inner", ref_id="A", expr="a"),
        PanelQuery(title="top", ref_id="A", expr="b"),
        PanelQuery(title="top", ref_id="B", expr="c"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the dashboard"),
        ('{"dashboard": {}}', "is not a Grafana dashboard"),
        ('{"panels": [{"title": "p", "targets": [{"refId": "A"}]}]}', "without PromQL"),
    ],
)
def test_panel_queries_refuses_what_it_cannot_check(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        panel_queries(path)


def test_panel_queries_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the dashboard"):
        panel_queries(tmp_path / "absent.json")


# --- instantiate -------------------------------------------------------------------------


def test_instantiate_substitutes_both_forms() -> None:
    expr = 'rate(x{model="$model"}[$__rate_interval]) / y{model="${model}"}[${__rate_interval}]'
    assert (
        instantiate(expr, "minilm", "30s")
        == 'rate(x{model="minilm"}[30s]) / y{model="minilm"}[30s]'
    )
    assert instantiate('x{model="$model"}[$__rate_interval]', "m") == 'x{model="m"}[1m]'


def test_instantiate_escapes_the_model_as_a_promql_string() -> None:
    assert instantiate('x{model="$model"}', 'a"b\\c') == 'x{model="a\\"b\\\\c"}'


def test_instantiate_leaves_no_variable_unresolved() -> None:
    with pytest.raises(ValueError, match=r"\$deployment"):
        instantiate('x{model="$model",deployment="$deployment"}', "m")
    with pytest.raises(ValueError, match="not a duration"):
        instantiate("rate(x[$__rate_interval])", "m", "1 minute")


def test_instantiate_does_not_take_a_longer_name_for_model() -> None:
    with pytest.raises(ValueError, match=r"\$models"):
        instantiate('x{model=~"$models"}', "m")
