"""The re-evaluation's decisions without I/O: regression vs tolerance, no verdict when the
endpoint never answers, scan staleness, drift of the live container, which deployments
are re-evaluated, and what is done (events, rollback) for each outcome."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

from gantry.adapters.haproxy import Slot
from gantry.errors import ConfigError, EndpointResponseError, EndpointUnavailableError
from gantry.record import StageRecord, StageStatus
from gantry.scoring import gate
from gantry.settings import Settings
from gantry.spec import EvalOptions
from gantry.stages.canary.rollback import RollbackResult
from gantry.stages.canary.state import CanaryStatus, DeploymentStatus, Phase, Served
from gantry.stages.evaluate import EvalResult
from gantry.stages.reevaluate import (
    EVENT_NO_VERDICT,
    EVENT_REGRESSED,
    SCANNED_AT_TAG,
    DeployedModel,
    ModelReevaluation,
    ReevalHooks,
    ReevaluateOptions,
    ReevaluationReport,
    ScanCheck,
    _act,
    _Outcome,
    baseline_of,
    drift_of,
    eval_set_changed,
    is_stale,
    last_scan_at,
    measure_with_retries,
    reevaluate_all,
    reevaluate_model,
    rollback_possible,
    select_targets,
)
from gantry.stages.scan import ScanResult
from tasks.reevaluate import report_table

pytestmark = pytest.mark.unit

RollbackAction = Literal[
    "aborted-canary", "restored-previous", "restored-champion", "nothing-to-do"
]

OPTS = EvalOptions(dataset="x.jsonl", metric="top1", threshold=0.8, tolerance=0.02)
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IMAGE = "127.0.0.1:5075/gantry/minilm@sha256:" + "a" * 64
SETTINGS = Settings.from_env({"GANTRY_STATE_DIR": "/nonexistent"})


def _served(version: str, slot: Slot = Slot.A) -> Served:
    return Served(
        version=version,
        release_id=f"r{version}",
        record=f"/r/{version}.json",
        image=IMAGE,
        slot=slot,
    )


# --- the verdict ----------------------------------------------------------------------------


def judge(score: float, baseline: float | None, opts: EvalOptions) -> tuple[bool, tuple[str, ...]]:
    """(regressed, why) as the re-evaluation decides it: the release's own gate against the
    score the version was accepted with."""
    verdict = gate(score, opts, baseline)
    return not verdict.passed, verdict.reasons


def test_a_score_within_tolerance_of_the_accepted_one_is_no_regression() -> None:
    assert judge(0.985, 1.0, OPTS) == (False, ())
    assert judge(0.98, 1.0, OPTS)[0] is False  # exactly at the tolerance


def test_a_drop_beyond_tolerance_is_a_regression_with_both_scores() -> None:
    regressed, reasons = judge(0.9, 1.0, OPTS)
    assert regressed
    assert any("0.9000" in r and "1.0000" in r and "tolerance 0.0200" in r for r in reasons)


def test_under_the_threshold_regresses_even_without_an_accepted_score() -> None:
    assert judge(0.5, None, OPTS)[0] is True
    assert judge(0.9, None, OPTS) == (False, ())


def test_the_baseline_is_the_release_runs_eval_metric() -> None:
    metrics = {"eval.top1": 1.0, "eval.mrr": 0.99, "eval.score": 1.0, "smoke.cold_start_s": 3}
    assert baseline_of(metrics, "top1") == 1.0
    assert baseline_of(metrics, "mrr") == 0.99
    assert baseline_of(metrics, "exact") is None


def test_a_changed_eval_set_voids_the_accepted_score() -> None:
    assert eval_set_changed("a" * 64, "a" * 64) is None
    assert eval_set_changed(None, "b" * 64) is None  # a release without the hash: compare
    note = eval_set_changed("a" * 64, "b" * 64)
    assert note is not None and "threshold only" in note and "aaaaaaaaaaaa" in note


def _eval(score: float) -> EvalResult:
    return EvalResult(metric="top1", score=score, threshold=0.8, tolerance=0.02, passed=True)


def test_an_endpoint_that_comes_back_is_measured_after_a_pause() -> None:
    calls: list[int] = []
    pauses: list[float] = []

    def once() -> EvalResult:
        calls.append(1)
        if len(calls) < 3:
            raise EndpointUnavailableError("http://127.0.0.1:1 did not answer")
        return _eval(1.0)

    result, why = measure_with_retries(once, 3, 7.0, pauses.append)
    assert result is not None and result.score == 1.0 and why is None
    assert pauses == [7.0, 7.0]


def test_an_endpoint_that_stays_down_gives_no_verdict_never_a_score() -> None:
    pauses: list[float] = []

    def once() -> EvalResult:
        raise EndpointUnavailableError("http://127.0.0.1:1 did not answer after 4 attempts")

    result, why = measure_with_retries(once, 3, 1.0, pauses.append)
    assert result is None
    assert why is not None and "no answer after 3 tries" in why and "127.0.0.1:1" in why
    assert len(pauses) == 2


def test_a_permanent_endpoint_error_is_not_retried() -> None:
    def once() -> EvalResult:
        raise EndpointResponseError("refused with HTTP 404")

    with pytest.raises(EndpointResponseError):
        measure_with_retries(once, 3, 0.0, lambda _s: pytest.fail("slept"))


# --- scan staleness -------------------------------------------------------------------------


def _scan(decision: Path) -> ScanResult:
    empty = {s: 0 for s in ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")}
    return ScanResult(
        image=IMAGE,
        passed=True,
        threshold="CRITICAL",
        vulnerabilities_checked=False,
        db_status="unavailable",
        db_updated_at=None,
        counts=empty,
        counts_counted=empty,
        counts_blocking=empty,
        counts_suppressed=empty,
        misconfig_counts=empty,
        blocking=(),
        ignored_unfixed=0,
        allowlist_used=(),
        allowlist_expired=(),
        allowlist_unused=(),
        sbom_path="sbom.json",
        sbom_components=1,
        report_path=None,
        config_report_path="c.json",
        decision_path=str(decision),
        os=None,
        trivy_version="0.59.1",
        warnings=(),
        scan_seconds=1.0,
    )


def test_a_reused_scan_counts_from_when_it_really_ran(tmp_path: Path) -> None:
    decision = tmp_path / "gate.json"
    decision.write_text("{}")
    scanned = NOW - timedelta(hours=30)
    os.utime(decision, (scanned.timestamp(), scanned.timestamp()))
    # The release re-used that scan an hour ago: the stage's own time is not the scan's.
    stage = StageRecord(
        status=StageStatus.SUCCEEDED, cached=True, finished_at=NOW - timedelta(hours=1)
    )
    last = last_scan_at(stage, _scan(decision), {})
    assert last == scanned
    assert is_stale(last, NOW, 24)
    assert not is_stale(last, NOW, 48)


def test_a_rescan_recorded_on_the_version_makes_the_scan_fresh(tmp_path: Path) -> None:
    stage = StageRecord(status=StageStatus.SUCCEEDED, finished_at=NOW - timedelta(days=3))
    rescanned = NOW - timedelta(hours=2)
    tags = {SCANNED_AT_TAG: rescanned.isoformat()}
    last = last_scan_at(stage, _scan(tmp_path / "gone.json"), tags)
    assert last == rescanned
    assert not is_stale(last, NOW, 24)


def test_an_unknown_scan_time_is_stale(tmp_path: Path) -> None:
    cached = StageRecord(status=StageStatus.SUCCEEDED, cached=True, finished_at=NOW)
    assert last_scan_at(cached, _scan(tmp_path / "gone.json"), {SCANNED_AT_TAG: "junk"}) is None
    assert last_scan_at(None, None, {}) is None
    assert is_stale(None, NOW, 1e6)
    assert is_stale(NOW, NOW, 0)  # 0 h: always re-scan


# --- drift of the live container ------------------------------------------------------------


def _attrs(tmp_path: Path, *, weights: Path, image: str = IMAGE, rw: bool = False) -> Any:
    return {
        "Config": {"Image": image, "Labels": {"ai.gantry.version": "3"}},
        "Mounts": [{"Destination": "/models", "Source": str(weights), "RW": rw}],
    }


def test_the_verified_release_serving_shows_no_drift(tmp_path: Path) -> None:
    attrs = _attrs(tmp_path, weights=tmp_path / "snap")
    kw = {"image": IMAGE, "weights_path": str(tmp_path / "snap"), "mount_point": "/models"}
    assert drift_of(attrs, version="3", **kw) == ()


def test_other_weights_image_or_version_in_the_slot_are_drift(tmp_path: Path) -> None:
    kw = {"image": IMAGE, "weights_path": str(tmp_path / "snap"), "mount_point": "/models"}
    other = _attrs(tmp_path, weights=tmp_path / "degraded", image=IMAGE.replace("a", "b"))
    found = drift_of(other, version="4", **kw)
    assert len(found) == 3
    assert any("degraded" in d for d in found)
    assert drift_of(_attrs(tmp_path, weights=tmp_path / "snap", rw=True), version="3", **kw) == (
        "the weights at /models are mounted writable",
    )
    assert drift_of(None, version="3", **kw) == ("no container in the champion's slot",)


# --- which deployments, and what is done ----------------------------------------------------


def _status(model: str, **kw: Any) -> DeploymentStatus:
    return DeploymentStatus(model=model, name=f"gantry-{model}", port=8080, **kw)


def test_only_deployments_with_a_champion_are_chosen_unless_named(tmp_path: Path) -> None:
    for st in (_status("a", champion=_served("1")), _status("b")):
        (tmp_path / st.name).mkdir()
        (tmp_path / st.name / "status.json").write_text(st.model_dump_json())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "status.json").write_text("{")
    chosen = select_targets(tmp_path, ())
    assert [(t.model, t.problem is None) for t in chosen] == [("a", True), ("broken", False)]
    named = select_targets(tmp_path, ("b", "nope"))
    assert named[0].status is not None and named[0].status.champion is None
    assert named[1].status is None and "nope has no deployment" in (named[1].problem or "")


def test_a_model_without_a_deployment_is_an_error_result_not_an_exception() -> None:
    r = reevaluate_model(
        DeployedModel(model="x", problem="x has no deployment"), SETTINGS, ReevaluateOptions()
    )
    assert r.verdict == "error" and r.problems == ["error: x has no deployment"]
    no_champ = reevaluate_model(
        DeployedModel(model="b", status=_status("b")), SETTINGS, ReevaluateOptions()
    )
    assert no_champ.verdict == "error" and "no champion" in no_champ.reasons[0]


def test_an_unexpected_failure_is_that_models_error_not_the_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gantry.stages.reevaluate as mod

    def broken(path: Path, what: str) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "release_from_record", broken)
    target = DeployedModel(model="m", status=_status("m", champion=_served("2")))
    r = reevaluate_model(target, SETTINGS, ReevaluateOptions())
    assert r.verdict == "error" and r.error is not None and r.error.type == "RuntimeError"
    assert r.problems == ["error: RuntimeError: boom"]


def test_rollback_needs_a_previous_champion_and_no_canary_in_flight() -> None:
    assert "no previous champion" in (rollback_possible(_status("m", champion=_served("2"))) or "")
    both = _status("m", champion=_served("2"), previous=_served("1", Slot.B))
    assert rollback_possible(both) is None
    both.canary = CanaryStatus(
        model="m", release_id="r3", candidate_version="3", champion_version="2", steps=(10, 100)
    )
    assert "canary of version 3 is in progress" in (rollback_possible(both) or "")
    both.canary.to(Phase.ROLLED_BACK)
    assert rollback_possible(both) is None


class Recorder:
    def __init__(self, action: RollbackAction = "restored-previous") -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.rollbacks: list[str] = []
        self.action = action

    def hooks(self) -> ReevalHooks:
        def rollback(model: str) -> RollbackResult:
            self.rollbacks.append(model)
            return RollbackResult(
                model=model,
                action=self.action,
                champion_version="1",
                removed_version="2",
                endpoint="http://127.0.0.1:8080",
                seconds=1.0,
            )

        return ReevalHooks(
            event=lambda m, n, p: self.events.append((m, n, dict(p))), rollback=rollback
        )


def _outcome(verdict: str, **values: Any) -> _Outcome:
    acc = _Outcome(model="m", started_at=NOW, t0=0.0)
    acc.set(verdict=verdict, version="2", **values)
    return acc


def test_a_regression_is_announced_and_rolled_back_only_when_asked() -> None:
    rec = Recorder()
    both = _status("m", champion=_served("2"), previous=_served("1", Slot.B))
    acc = _outcome("regressed", score=0.3, baseline=1.0, reasons=("dropped",))
    _act(acc, both, SETTINGS, ReevaluateOptions(), rec.hooks())
    assert [n for _, n, _ in rec.events] == [EVENT_REGRESSED] and rec.rollbacks == []
    assert rec.events[0][2]["score"] == 0.3 and rec.events[0][2]["baseline"] == 1.0
    assert acc.result().action == "none"

    acc = _outcome("regressed", score=0.3, baseline=1.0)
    _act(acc, both, SETTINGS, ReevaluateOptions(rollback_on_regression=True), rec.hooks())
    r = acc.result()
    assert rec.rollbacks == ["m"] and r.action == "rolled-back" and r.rollback is not None


def test_no_previous_champion_means_no_rollback_call() -> None:
    rec = Recorder()
    acc = _outcome("regressed", score=0.3, baseline=1.0)
    only = _status("m", champion=_served("2"))
    _act(acc, only, SETTINGS, ReevaluateOptions(rollback_on_regression=True), rec.hooks())
    assert rec.rollbacks == [] and acc.result().action == "rollback-unavailable"


def test_no_verdict_is_announced_but_never_rolled_back() -> None:
    rec = Recorder()
    both = _status("m", champion=_served("2"), previous=_served("1", Slot.B))
    acc = _outcome("no-verdict", reasons=("no answer after 3 tries",))
    _act(acc, both, SETTINGS, ReevaluateOptions(rollback_on_regression=True), rec.hooks())
    assert [n for _, n, _ in rec.events] == [EVENT_NO_VERDICT] and rec.rollbacks == []
    r = acc.result()
    assert r.action == "none" and r.problems == ["no-verdict: no answer after 3 tries"]


def test_passing_is_silent_and_the_report_is_ok_only_without_problems() -> None:
    rec = Recorder()
    acc = _outcome("passed", score=1.0, baseline=1.0, metric="top1")
    _act(acc, _status("m", champion=_served("2")), SETTINGS, ReevaluateOptions(), rec.hooks())
    assert rec.events == []
    good = acc.result()
    blocked = good.model_copy(
        update={
            "scan": ScanCheck(
                last_scanned_at=None,
                max_age_hours=24,
                stale=True,
                rescanned=True,
                passed=False,
                blocking=("CVE-2099-1",),
                blocking_count=1,
            )
        }
    )

    def report(*models: ModelReevaluation) -> ReevaluationReport:
        return ReevaluationReport(
            started_at=NOW, finished_at=NOW, options=ReevaluateOptions(), models=models
        )

    assert report(good).ok and report().ok
    assert not report(good, blocked).ok
    assert report(blocked).problems() == [
        "m v2: re-scan: 1 finding(s) now block the image (CVE-2099-1)"
    ]
    row = report_table(report(good))[0]
    assert row["verdict"] == "passed" and row["score"] == "1.0000" and row["problems"] == ""


def test_nothing_deployed_is_an_empty_report_that_is_ok(tmp_path: Path) -> None:
    report = reevaluate_all(
        ReevaluateOptions(), Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    )
    assert report.models == () and report.ok
    named = reevaluate_all(
        ReevaluateOptions(models=("m",)), Settings.from_env({"GANTRY_STATE_DIR": str(tmp_path)})
    )
    assert not named.ok and "m has no deployment" in named.problems()[0]


def test_options_name_the_bad_field() -> None:
    with pytest.raises(ConfigError, match="max_scan_age_hours"):
        ReevaluateOptions.of(max_scan_age_hours=-1)
    assert ReevaluateOptions.of(models=("a",)).models == ("a",)
