"""Docker's stats contract: every document the engine here really answered (recorded under
tests/data/docker-stats; see its README) parses, and one of a container that is not
running is refused with a typed error, never read as zero usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gantry.adapters.docker_stats import StatsSample, parse_stats
from gantry.errors import StatsUnavailableError

pytestmark = pytest.mark.contract

DATA = Path(__file__).resolve().parents[1] / "data" / "docker-stats"
RUNNING = ("v1-running-limited", "v1-running-unlimited", "v1-running-limited-two-sample")
STOPPED = ("v1-exited", "v1-created")


def _raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return data


def test_every_recorded_file_is_named_here() -> None:
    assert {p.stem for p in DATA.glob("*.json")} == {*RUNNING, *STOPPED}


@pytest.mark.parametrize("name", RUNNING)
def test_running_container_parses(name: str) -> None:
    raw = _raw(name)
    s = parse_stats(raw)
    assert isinstance(s, StatsSample)
    assert s.read_at.year > 2000 and s.read_at.tzinfo is not None
    assert s.cpu_seconds_total == raw["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9 > 0
    mem = raw["memory_stats"]
    # The working set as `docker stats` shows it: usage less the inactive page cache.
    assert s.memory_bytes == mem["usage"] - mem["stats"]["total_inactive_file"]
    assert 70 * 2**20 < s.memory_bytes < 120 * 2**20  # ~80 MB string held by the shell
    assert s.online_cpus == 2


def test_limit_is_read_and_unlimited_is_none() -> None:
    assert parse_stats(_raw("v1-running-limited")).memory_limit_bytes == 256 * 2**20
    # The engine reports the host's memory as an unlimited container's limit; cgroup v1's
    # hierarchical limit (~2**63) says it is unlimited.
    unlimited = _raw("v1-running-unlimited")
    assert unlimited["memory_stats"]["limit"] > 0
    assert parse_stats(unlimited).memory_limit_bytes is None


def test_nanosecond_read_time_is_kept_to_the_microsecond() -> None:
    raw = _raw("v1-running-limited")
    s = parse_stats(raw)
    assert s.read_at.isoformat().replace("+00:00", "")[:26] == raw["read"][:26]


@pytest.mark.parametrize("name", STOPPED)
def test_stopped_container_is_refused_not_zero(name: str) -> None:
    with pytest.raises(StatsUnavailableError, match="not running"):
        parse_stats(_raw(name))


def test_cgroup_v2_shape() -> None:
    """A cgroup v2 document (constructed: this host runs v1): ``inactive_file``, no
    hierarchical limit, so an unlimited limit is told by the host's memory."""
    raw: dict[str, Any] = {
        "read": "2026-01-02T03:04:05.123456789Z",
        "cpu_stats": {"cpu_usage": {"total_usage": 2_500_000_000}, "online_cpus": 4},
        "memory_stats": {
            "usage": 300 * 2**20,
            "limit": 8 * 2**30,
            "stats": {"inactive_file": 100 * 2**20, "anon": 190 * 2**20},
        },
    }
    s = parse_stats(raw)
    assert (s.cpu_seconds_total, s.memory_bytes, s.online_cpus) == (2.5, 200 * 2**20, 4)
    assert s.memory_limit_bytes == 8 * 2**30
    assert parse_stats(raw, host_memory_bytes=8 * 2**30).memory_limit_bytes is None
    assert parse_stats(raw, host_memory_bytes=16 * 2**30).memory_limit_bytes == 8 * 2**30
    # Inactive cache over the usage (a racy read) leaves the usage as it is.
    raw["memory_stats"]["stats"] = {"inactive_file": 400 * 2**20}
    assert parse_stats(raw).memory_bytes == 300 * 2**20
