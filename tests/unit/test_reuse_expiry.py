"""Gates never pass on stale data: when an earlier scan or evaluation of the same release
may no longer be re-used."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gantry.settings import Settings
from gantry.spec import AllowlistEntry, ScanOptions, parse_spec
from gantry.stages import evaluate as evaluate_stage
from gantry.stages.evaluate import EvalResult
from gantry.stages.scan import TRUST_FIXTURE_DB_ENV, ScanResult, stale_because

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _scan(**kw: Any) -> ScanResult:
    values: dict[str, Any] = {
        "allowlist_used": (),
        "db_status": "cached",
        "vulnerabilities_checked": True,
        "db_updated_at": NOW - timedelta(hours=10),
        # Files the scan wrote: any file of this host will do.
        "sbom_path": __file__,
        "report_path": None,
        "config_report_path": __file__,
        "decision_path": __file__,
        **kw,
    }
    return ScanResult.model_construct(**values)


def _entry(expires: date) -> AllowlistEntry:
    return AllowlistEntry(id="CVE-2026-1", reason="accepted by sec", expires=expires)


def test_a_scan_expires_with_its_allowlist_entries_and_its_db(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts = ScanOptions(max_db_age_hours=72)
    assert stale_because(_scan(), opts, NOW) is None
    assert stale_because(_scan(allowlist_used=(_entry(NOW.date()),)), opts, NOW) is None
    gone = stale_because(_scan(allowlist_used=(_entry(date(2026, 12, 5)),)), opts, NOW)
    assert gone is not None and "CVE-2026-1" in gone
    old = stale_because(_scan(db_updated_at=NOW - timedelta(hours=73)), opts, NOW)
    assert old is not None and "73 h" in old
    assert stale_because(_scan(db_updated_at=None), opts, NOW) is not None
    # An unchecked scan (allow_offline, no DB) has no DB to age.
    unchecked = _scan(vulnerabilities_checked=False, db_status="unavailable", db_updated_at=None)
    assert stale_because(unchecked, opts, NOW) is None
    # A test fixture DB counts in Gantry's tests only.
    assert stale_because(_scan(db_status="fixture"), opts, NOW) is None
    monkeypatch.delenv(TRUST_FIXTURE_DB_ENV)
    assert stale_because(_scan(db_status="fixture"), opts, NOW) == (
        "it was judged with a test fixture DB"
    )


def test_a_scan_whose_reports_are_on_another_host_is_run_again(tmp_path: Path) -> None:
    """A scan taken over from another host's record (several hosts) names that host's
    files; `sign` attests the SBOM, so it must be here."""
    gone = str(tmp_path / "host-a" / "sbom.cdx.json")
    why = stale_because(_scan(sbom_path=gone), ScanOptions(), NOW)
    assert why is not None and gone in why and "another host" in why


def test_an_evaluation_is_reused_only_on_the_same_eval_set_and_champion_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n')
    spec = parse_spec(
        {
            "name": "m",
            "source": {"repo_id": "a/b", "revision": "v1"},
            "evaluate": {"dataset": str(data)},
        }
    )
    settings = Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path / "state")})
    earlier = EvalResult(
        metric="top1", threshold=0.8, tolerance=0.02, passed=True, champion_score=0.9
    )

    def key(**kw: Any) -> str | None:
        return evaluate_stage.reuse_key(spec, settings, "img wts sig", **kw)

    same = key(earlier=earlier, store_unchanged=True)
    assert same is not None and same == key(earlier=earlier, store_unchanged=True)
    data.write_text('{"query": "a", "positive": "c"}\n')  # the eval set was edited
    assert key(earlier=earlier, store_unchanged=True) != same
    # The store changed since (another champion?): the score is read from MLflow now.
    asked: list[str] = []

    def champion(_spec: Any, _settings: Any) -> Any:
        def lookup(model: str) -> dict[str, float]:
            asked.append(model)
            return {"top1": 0.95}

        return lookup

    monkeypatch.setattr(evaluate_stage, "mlflow_champion_metrics", champion)
    changed = key(earlier=earlier, store_unchanged=False)
    assert asked == ["m"] and changed is not None and changed.endswith("champion:0.95")
