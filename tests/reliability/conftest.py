"""Fixtures of the reliability suite, and the record of what it tried.

Every test takes the ``scenario`` fixture and says what it did and what happened; pytest's
own verdict is added, and at the end of the session the scenarios are merged into
``.gantry/reliability/results.json`` (by test id), from which
``scripts/reliability_table.py`` writes the README's Reliability table. Nothing is
written when no reliability test ran.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import anyio
import httpx
import pytest
import yaml

from tests.support import REPO_ROOT, GantryEnv, PrefectServer

RESULTS = REPO_ROOT / ".gantry" / "reliability"
RESULTS_FILE = RESULTS / "results.json"
_RETRY = re.compile(r"Retry (\d+)/(\d+) will start")
T = TypeVar("T")

#: Canary settings for releases that run several at once on 2 cores (CI saw the probes
#: slow to about one a second): those tests are about locks and hosts, not statistics.
BUSY_MACHINE_CANARY = {
    "window_s": 4,
    "interval_s": 0.5,
    "min_requests": 3,
    "keep_warm_s": 0,
    "drain_s": 5,
    # The machines are shared: latency must not decide here (tests/unit judge it).
    "max_latency_ratio": 100,
    "latency_slack_ms": 60_000,
}


def busy_demo_spec(root: Path, model: str, revision: str) -> dict[str, Any]:
    """The demo spec as ``model`` at ``revision``: every 20th item of its eval set (kept in
    ``root``), its own MLflow model, :data:`BUSY_MACHINE_CANARY`."""
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples" / "minilm-demo.yaml").read_text())
    lines = (REPO_ROOT / data["evaluate"]["dataset"]).read_text().splitlines()
    subset = root / "eval.jsonl"
    subset.write_text("\n".join(lines[::20]) + "\n")
    data["name"] = model
    data["source"]["revision"] = revision
    data["evaluate"]["dataset"] = str(subset)
    data["mlflow"] = {"model_name": model}
    data["canary"] = BUSY_MACHINE_CANARY
    return data


@dataclass
class Scenario:
    """One line of the Reliability table; the test fills in what it observed."""

    id: str
    group: str = ""
    title: str = ""
    outcome: str = ""
    #: What the scenario lost, as the test checked it (empty: nothing).
    data_lost: list[str] = field(default_factory=list)
    result: str = "not run"
    duration_s: float = 0.0
    at: str = ""
    #: Position in the collection order, so the table follows the suite.
    seq: int = 0

    def child(self, key: str, *, group: str, title: str) -> Scenario:
        """Another line of the table from the same test (``<test id>::<key>``). The test
        sets its ``result`` to passed once it has checked it; else it takes the test's."""
        n = sum(1 for i in _SCENARIOS if i.startswith(self.id + "::")) + 1
        s = Scenario(id=f"{self.id}::{n}-{key}", group=group, title=title, at=self.at)
        s.seq = self.seq
        _SCENARIOS[s.id] = s
        return s


#: This session's scenarios, by test id.
_SCENARIOS: dict[str, Scenario] = {}
#: Every test collected this session, deselected ones too, in collection order.
_COLLECTED: dict[str, int] = {}


def pytest_itemcollected(item: pytest.Item) -> None:
    _COLLECTED.setdefault(item.nodeid, len(_COLLECTED))


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Scenario:
    """The record of this test's scenario; set ``title``, ``outcome`` and ``data_lost``."""
    s = Scenario(
        id=request.node.nodeid,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        seq=_COLLECTED.get(request.node.nodeid, 0),
    )
    _SCENARIOS[s.id] = s
    return s


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not (report.when == "call" or report.failed):
        return
    verdict = "passed" if report.passed else "failed" if report.failed else "skipped"
    for s in _SCENARIOS.values():
        if s.id == report.nodeid:
            s.result = verdict
            s.duration_s = round(s.duration_s + report.duration, 1)
        elif s.id.startswith(report.nodeid + "::") and s.result == "not run":
            s.result = verdict  # a line the test never got to check


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _SCENARIOS:
        return
    merged: dict[str, dict[str, object]] = {}
    if RESULTS_FILE.is_file():
        try:
            merged = {e["id"]: e for e in json.loads(RESULTS_FILE.read_text())["scenarios"]}
        except (ValueError, KeyError, TypeError):
            merged = {}  # unreadable: start over rather than fail the session
    # A test gone from a file collected now (renamed, removed) loses its old lines.
    files = {i.split("::")[0] for i in _COLLECTED}
    merged = {
        i: e
        for i, e in merged.items()
        if i.split("::")[0] not in files
        or any(i == c or i.startswith(c + "::") for c in _COLLECTED)
    }
    # A test that ran now replaces all its lines (its child lines may have changed too).
    ran = {s.id for s in _SCENARIOS.values()}
    merged = {i: e for i, e in merged.items() if not any(i.startswith(r + "::") for r in ran)}
    merged.update({s.id: asdict(s) for s in _SCENARIOS.values()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_FILE.with_name(f".{RESULTS_FILE.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"scenarios": sorted(merged.values(), key=_order)}, indent=2))
    os.replace(tmp, RESULTS_FILE)


def _order(entry: dict[str, object]) -> tuple[str, int, str]:
    seq = entry.get("seq", 0)
    return str(entry.get("group", "")), seq if isinstance(seq, int) else 0, str(entry.get("id"))


# --- the services ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api(prefect_server: PrefectServer) -> Iterator[str]:
    """This process's Prefect client pointed at the session's real Prefect server, so the
    tasks run with Prefect's own retry machinery."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
        temporary_settings,
    )

    # Stage tasks run here outside any flow: their logs have no flow run to go to.
    updates = {
        PREFECT_API_URL: prefect_server.api_url,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore",
    }
    with temporary_settings(updates=updates):
        yield prefect_server.api_url


class HubFaults:
    """The ``/_gantry/faults`` endpoint of the session's real Hub endpoint."""

    def __init__(self, env: GantryEnv) -> None:
        self.url = f"{env.hub_url}/_gantry/faults"

    def add(self, **rule: object) -> None:
        httpx.post(self.url, json=rule, timeout=10).raise_for_status()

    def pending(self) -> list[dict[str, object]]:
        return list(httpx.get(self.url, timeout=10).json()["faults_pending"])

    def clear(self) -> None:
        httpx.delete(self.url, timeout=10).raise_for_status()


@pytest.fixture
def hub_faults(gantry_env: GantryEnv) -> Iterator[HubFaults]:
    faults = HubFaults(gantry_env)
    faults.clear()
    try:
        yield faults
    finally:
        faults.clear()


class RetryLog:
    """Runs stage tasks inside a real flow run and reads Prefect's retry decisions back
    from the Prefect server's log store, where a person looking at the run sees them."""

    def __init__(self) -> None:
        self.flow_runs: list[str] = []

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a stage task call) inside a flow run of its own."""
        from prefect import flow
        from prefect.runtime import flow_run

        @flow(name="fault-injection", persist_result=False)
        def fault_injection() -> T:
            self.flow_runs.append(str(flow_run.get_id()))
            return fn()

        return fault_injection()

    def retries(self) -> list[str]:
        """The "Retry n/m will start …" lines of the flow runs, in order, as stored by
        the Prefect server (read until two reads agree: logs are shipped in batches)."""
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # blocks until the queued log batches are sent
        last: list[str] | None = None
        deadline = time.monotonic() + 20
        while True:
            now = [m for m in self._messages() if _RETRY.search(m)]
            if now == last or time.monotonic() > deadline:
                return now
            last = now
            time.sleep(1.0)

    def _messages(self) -> list[str]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        async def read() -> list[str]:
            async with get_client() as client:
                logs = await client.read_logs(
                    LogFilter(
                        flow_run_id=LogFilterFlowRunId(any_=[UUID(i) for i in self.flow_runs])
                    ),
                    limit=200,  # the server refuses a null limit
                    offset=0,
                    sort=LogSort.TIMESTAMP_ASC,
                )
            return [log.message for log in logs]

        return anyio.run(read) if self.flow_runs else []


@pytest.fixture
def retry_log(prefect_api: str) -> RetryLog:
    return RetryLog()
