"""Re-evaluation's restart check: the champion container's RestartCount against what the
previous re-evaluation recorded on the version; more than 2 restarts a day is a problem."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gantry.stages.reevaluate import (
    CONTAINER_TAG,
    LAST_AT_TAG,
    RESTART_COUNT_TAG,
    ModelReevaluation,
    restart_check,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
CID = "c" * 64


def _attrs(count: int, created: datetime = NOW - timedelta(days=30)) -> dict[str, object]:
    # As `docker inspect` writes them: nanoseconds and a Z.
    return {
        "Id": CID,
        "RestartCount": count,
        "Created": created.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
    }


def _tags(count: int, at: datetime, cid: str = CID) -> dict[str, str]:
    return {RESTART_COUNT_TAG: str(count), CONTAINER_TAG: cid, LAST_AT_TAG: at.isoformat()}


def test_no_container_no_check() -> None:
    assert restart_check(None, {}, NOW) is None


def test_restarts_since_the_last_reevaluation() -> None:
    r = restart_check(_attrs(7), _tags(5, NOW - timedelta(days=1)), NOW)
    assert r is not None
    assert (r.restart_count, r.restarts, r.per_day, r.flagged) == (7, 2, 2.0, False)
    assert r.since == NOW - timedelta(days=1)
    r = restart_check(_attrs(8), _tags(5, NOW - timedelta(days=1)), NOW)
    assert r is not None and r.restarts == 3 and r.flagged
    assert r.problem is not None
    assert "restarted 3 time(s)" in r.problem and "over 2/day" in r.problem


def test_a_short_interval_counts_as_a_day() -> None:
    """An hour after the last run, one restart is not 24 a day."""
    r = restart_check(_attrs(6), _tags(5, NOW - timedelta(hours=1)), NOW)
    assert r is not None and r.restarts == 1 and r.per_day == 1.0 and not r.flagged
    r = restart_check(_attrs(8), _tags(5, NOW - timedelta(hours=1)), NOW)
    assert r is not None and r.flagged


def test_a_long_interval_spreads_the_restarts() -> None:
    r = restart_check(_attrs(15), _tags(5, NOW - timedelta(days=10)), NOW)
    assert r is not None and r.restarts == 10 and r.per_day == 1.0 and not r.flagged


def test_another_container_counts_from_its_creation() -> None:
    created = NOW - timedelta(hours=6)
    r = restart_check(_attrs(3, created), _tags(9, NOW - timedelta(days=1), cid="d" * 64), NOW)
    assert r is not None and r.restarts == 3 and r.flagged
    assert r.since == created + timedelta(microseconds=123456)  # from `Created`
    first = restart_check(_attrs(0, created), {}, NOW)  # never re-evaluated before
    assert first is not None and first.restarts == 0 and first.problem is None


def test_a_flagged_container_is_a_problem_of_the_model() -> None:
    r = restart_check(_attrs(8), _tags(5, NOW - timedelta(days=1)), NOW)
    m = ModelReevaluation(model="m", verdict="passed", restarts=r, started_at=NOW, seconds=1.0)
    assert len(m.problems) == 1 and m.problems[0].startswith("restarts: ")
