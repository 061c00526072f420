"""`gantry.locks.lock_for`: the file lock on one machine, the Prefect lock across hosts,
and the two call sites (release lock, deployment lock) use it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gantry import locks
from gantry.errors import ReleaseInProgressError
from gantry.locks import _limit_name, lock_for
from gantry.record import one_run_at_a_time
from gantry.settings import Settings
from gantry.stages.canary.state import DeploymentStore

pytestmark = pytest.mark.unit


def _settings(tmp_path: Path, topology: str) -> Settings:
    return Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path), "GANTRY_TOPOLOGY": topology})


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Prefect locks taken (no server: the lock is recorded, not taken)."""
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def fake(name: str, **kw: Any) -> Iterator[None]:
        calls.append({"name": name, **kw})
        yield

    monkeypatch.setattr(locks, "prefect_exclusive", fake)
    return calls


def test_single_takes_the_file_lock(tmp_path: Path, taken: list[dict[str, Any]]) -> None:
    path = tmp_path / "locks" / "r.lock"
    with lock_for(_settings(tmp_path, "single"), "gantry-release-r", path)(
        wait_s=0, holder="release r", busy=RuntimeError
    ):
        assert "release r" in path.read_text()
    assert taken == []


def test_multi_takes_the_prefect_lock(tmp_path: Path, taken: list[dict[str, Any]]) -> None:
    path = tmp_path / "locks" / "r.lock"
    with lock_for(_settings(tmp_path, "multi"), "gantry-release-r", path)(
        wait_s=3, holder="release r", busy=RuntimeError
    ):
        pass
    assert taken == [
        {"name": "gantry-release-r", "wait_s": 3, "holder": "release r", "busy": RuntimeError}
    ]
    assert not path.exists()


def test_the_call_sites_follow_the_topology(
    tmp_path: Path, taken: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GANTRY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("GANTRY_TOPOLOGY", "multi")
    with one_run_at_a_time(tmp_path / "releases", "rel-1"):
        pass
    with DeploymentStore(tmp_path / "deployments", "minilm").lock(5, "rel-1"):
        pass
    assert [(c["name"], c["wait_s"], c["holder"]) for c in taken] == [
        ("gantry-release-rel-1", 0, "release rel-1"),
        ("gantry-deploy-minilm", 5, "rel-1"),
    ]
    assert isinstance(taken[0]["busy"]("x, host h, pid 1"), ReleaseInProgressError)
    assert not (tmp_path / "releases" / "locks").exists()

    monkeypatch.setenv("GANTRY_TOPOLOGY", "single")
    with one_run_at_a_time(tmp_path / "releases", "rel-2"):
        assert (tmp_path / "releases" / "locks" / "rel-2.lock").exists()
    assert len(taken) == 2


def test_lock_names_are_prefect_safe_and_stay_distinct() -> None:
    assert _limit_name("gantry-deploy-minilm_v2") == "gantry-deploy-minilm_v2"
    dotted, dashed = _limit_name("gantry-deploy-a.b"), _limit_name("gantry-deploy-a-b")
    assert dotted.startswith("gantry-deploy-a-b-") and dotted != dashed
    assert "/" not in _limit_name("gantry-deploy-org/model")
