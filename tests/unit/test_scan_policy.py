"""The vulnerability gate (gantry.stages.scan.policy): pure decisions over findings."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from gantry.adapters.trivy import Finding
from gantry.errors import SpecError
from gantry.spec import AllowlistEntry, ScanOptions, Severity, parse_spec
from gantry.stages.scan.policy import (
    decide,
    describe_findings,
    severity_counts,
    worst_first,
)

pytestmark = pytest.mark.unit

TODAY = date(2026, 3, 1)


def vuln(
    id: str = "CVE-2024-0001",
    severity: Severity = Severity.CRITICAL,
    package: str = "openssl",
    fixed: str | None = "3.0.2-1",
) -> Finding:
    return Finding(
        kind="vulnerability",
        id=id,
        package=package,
        installed_version="3.0.1-1",
        fixed_version=fixed,
        severity=severity,
        title=f"{package}: something bad",
    )


def misconfig(
    id: str = "AVD-DS-0002", alias: str = "DS002", severity: Severity = Severity.HIGH
) -> Finding:
    return Finding(
        kind="misconfiguration",
        id=id,
        aliases=(alias,),
        package="Dockerfile",
        severity=severity,
        title="Image user should not be 'root'",
    )


def entry(
    id: str = "CVE-2024-0001",
    *,
    expires: date = TODAY + timedelta(days=30),
    package: str | None = None,
) -> AllowlistEntry:
    return AllowlistEntry(
        id=id, reason="accepted by security review", expires=expires, package=package
    )


def opts(**kw: Any) -> ScanOptions:
    return ScanOptions(**kw)


def test_no_findings_passes_with_zero_counts() -> None:
    d = decide([], opts(), TODAY)
    assert d.passed and d.blocking == ()
    assert d.counts_before == {s.value: 0 for s in reversed(Severity)}
    assert list(d.counts_before) == ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]


def test_critical_fails_at_the_default_threshold() -> None:
    d = decide([vuln()], opts(), TODAY)
    assert not d.passed
    assert [f.id for f in d.blocking] == ["CVE-2024-0001"]
    assert d.counts_before["CRITICAL"] == d.counts_after["CRITICAL"] == 1


def test_high_does_not_block_at_critical_but_does_at_high() -> None:
    findings = [vuln(severity=Severity.HIGH)]
    assert decide(findings, opts(), TODAY).passed
    d = decide(findings, opts(severity=Severity.HIGH), TODAY)
    assert not d.passed and d.blocking[0].severity is Severity.HIGH
    # Lower severities are counted but never block at HIGH.
    d = decide([vuln(severity=Severity.MEDIUM)], opts(severity=Severity.HIGH), TODAY)
    assert d.passed and d.counts_after["MEDIUM"] == 1


def test_unknown_threshold_blocks_everything() -> None:
    d = decide([vuln(severity=Severity.UNKNOWN)], opts(severity=Severity.UNKNOWN), TODAY)
    assert not d.passed


def test_allowlisted_passes_and_is_reported() -> None:
    e = entry()
    d = decide([vuln()], opts(allowlist=(e,)), TODAY)
    assert d.passed
    assert [(s.finding.id, s.entry) for s in d.suppressed] == [("CVE-2024-0001", e)]
    assert d.entries_used == (e,) and d.entries_expired == () and d.unused_entries == ()
    assert d.counts_before["CRITICAL"] == 1 and d.counts_after["CRITICAL"] == 0


def test_entry_suppresses_through_its_expiry_day_inclusive() -> None:
    e = entry(expires=TODAY)
    assert decide([vuln()], opts(allowlist=(e,)), TODAY).passed


def test_expired_entry_fails_again_and_is_reported() -> None:
    e = entry(expires=TODAY - timedelta(days=1))
    d = decide([vuln()], opts(allowlist=(e,)), TODAY)
    assert not d.passed
    assert d.suppressed == ()
    assert [(s.finding.id, s.entry) for s in d.expired] == [("CVE-2024-0001", e)]
    assert d.entries_expired == (e,)
    assert d.unused_entries == ()  # it matched; it just no longer counts


def test_active_entry_wins_over_an_expired_one() -> None:
    old, new = entry(expires=TODAY - timedelta(days=90)), entry(expires=TODAY + timedelta(days=1))
    d = decide([vuln()], opts(allowlist=(old, new)), TODAY)
    assert d.passed and d.suppressed[0].entry == new and d.expired == ()


def test_the_latest_lapsed_entry_is_the_one_reported() -> None:
    a, b = entry(expires=TODAY - timedelta(days=90)), entry(expires=TODAY - timedelta(days=2))
    d = decide([vuln()], opts(allowlist=(a, b)), TODAY)
    assert d.expired[0].entry == b


def test_package_scoped_entry_only_suppresses_that_package() -> None:
    e = entry(package="openssl")
    findings = [vuln(package="openssl"), vuln(package="libssl3")]
    d = decide(findings, opts(allowlist=(e,)), TODAY)
    assert [s.finding.package for s in d.suppressed] == ["openssl"]
    assert [f.package for f in d.blocking] == ["libssl3"]


def test_entry_for_another_id_suppresses_nothing_and_is_unused() -> None:
    e = entry(id="CVE-2024-9999")
    d = decide([vuln()], opts(allowlist=(e,)), TODAY)
    assert not d.passed and d.unused_entries == (e,)


def test_ids_match_case_insensitively() -> None:
    assert decide([vuln()], opts(allowlist=(entry(id="cve-2024-0001"),)), TODAY).passed


def test_unfixed_is_ignored_only_when_asked() -> None:
    unfixed = vuln(fixed=None)
    assert not decide([unfixed], opts(), TODAY).passed
    d = decide([unfixed, vuln(id="CVE-2024-0002")], opts(ignore_unfixed=True), TODAY)
    assert [f.id for f in d.ignored_unfixed] == ["CVE-2024-0001"]
    assert [f.id for f in d.blocking] == ["CVE-2024-0002"]  # fixed ones still count
    assert d.counts_before["CRITICAL"] == 2 and d.counts_after["CRITICAL"] == 1


def test_empty_fixed_version_counts_as_unfixed() -> None:
    d = decide([vuln(fixed="")], opts(ignore_unfixed=True), TODAY)
    assert d.passed and len(d.ignored_unfixed) == 1


def test_misconfigurations_are_gated_the_same_way() -> None:
    m = misconfig(severity=Severity.CRITICAL)
    assert not decide([m], opts(), TODAY).passed
    # ignore_unfixed never drops a misconfiguration: editing the Dockerfile fixes it.
    assert not decide([m], opts(ignore_unfixed=True), TODAY).passed
    assert decide([m], opts(allowlist=(entry(id="AVD-DS-0002"),)), TODAY).passed
    expired = entry(id="AVD-DS-0002", expires=TODAY - timedelta(days=1))
    assert not decide([m], opts(allowlist=(expired,)), TODAY).passed


def test_misconfiguration_is_allowlisted_by_avd_id_and_file() -> None:
    m = misconfig(severity=Severity.CRITICAL)
    # The spec's id pattern needs a `-`, so checks are allowlisted by their AVD id (the
    # short DS002 is kept as an alias for display and future use).
    assert m.matches(entry(id="AVD-DS-0002")) and not m.matches(entry(id="AVD-DS-0001"))
    scoped = entry(id="AVD-DS-0002", package="Dockerfile")
    assert decide([m], opts(allowlist=(scoped,)), TODAY).passed
    other = entry(id="AVD-DS-0002", package="other.Dockerfile")
    assert not decide([m], opts(allowlist=(other,)), TODAY).passed


def test_blocking_is_worst_first_and_stable() -> None:
    findings = [
        vuln(id="CVE-2024-0003", severity=Severity.HIGH),
        vuln(id="CVE-2024-0002", severity=Severity.CRITICAL),
        vuln(id="CVE-2024-0001", severity=Severity.CRITICAL),
    ]
    d = decide(findings, opts(severity=Severity.HIGH), TODAY)
    assert [f.id for f in d.blocking] == ["CVE-2024-0001", "CVE-2024-0002", "CVE-2024-0003"]
    assert worst_first(reversed(findings)) == d.blocking


def test_severity_counts_has_every_severity() -> None:
    counts = severity_counts([vuln(), vuln(severity=Severity.LOW), vuln(severity=Severity.LOW)])
    assert counts == {"CRITICAL": 1, "HIGH": 0, "MEDIUM": 0, "LOW": 2, "UNKNOWN": 0}


def test_decision_is_frozen_and_serialisable() -> None:
    d = decide([vuln()], opts(allowlist=(entry(expires=TODAY - timedelta(days=1)),)), TODAY)
    with pytest.raises(ValueError):
        d.threshold = Severity.LOW  # type: ignore[misc]
    dumped = d.model_dump(mode="json")
    assert dumped["expired"][0]["entry"]["expires"] == "2026-02-28"
    assert dumped["blocking"][0]["severity"] == "CRITICAL"


def test_describe_findings_lists_the_top_ones() -> None:
    findings = [vuln(id=f"CVE-2024-{i:04d}") for i in range(12)]
    text = describe_findings(findings, top=10)
    lines = text.splitlines()
    assert len(lines) == 11 and "CVE-2024-0000" in lines[0]
    assert "openssl 3.0.1-1 (fixed in 3.0.2-1)" in lines[0]
    assert lines[-1].strip() == "… and 2 more (see the scan report)"
    assert "no fix yet" in describe_findings([vuln(fixed=None)])
    assert "Dockerfile: Image user" in describe_findings([misconfig()])


# --- spec-level validation (pydantic's job, checked here from the gate's side) ----------

SPEC: dict[str, Any] = {
    "name": "minilm",
    "source": {"repo_id": "gantry-demo/all-MiniLM-L6-v2", "revision": "v1"},
}


def test_spec_rejects_an_unknown_severity_naming_the_field() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "scan": {"severity": "SEVERE"}})
    assert "scan.severity:" in str(e.value)
    assert "CRITICAL" in str(e.value)  # the allowed values are listed


def test_spec_rejects_an_allowlist_entry_without_expiry_naming_the_field() -> None:
    data = {**SPEC, "scan": {"allowlist": [{"id": "CVE-2024-0001", "reason": "accepted"}]}}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert "scan.allowlist.0.expires: Field required" in str(e.value)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "not an id", "reason": "accepted", "expires": "2026-01-01"}, "allowlist.0.id:"),
        ({"id": "CVE-2024-1", "reason": "ok", "expires": "2026-01-01"}, "allowlist.0.reason:"),
        ({"id": "CVE-2024-1", "reason": "accepted", "expires": "soon"}, "allowlist.0.expires:"),
        (
            {"id": "CVE-2024-1", "reason": "accepted", "expires": "2026-01-01", "pkg": "x"},
            "allowlist.0.pkg: unknown field",
        ),
    ],
)
def test_spec_rejects_malformed_allowlist_entries(item: dict[str, str], field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "scan": {"allowlist": [item]}})
    assert f"scan.{field}" in str(e.value)


def test_spec_parses_a_good_gate() -> None:
    spec = parse_spec(
        {
            **SPEC,
            "scan": {
                "severity": "HIGH",
                "ignore_unfixed": True,
                "allowlist": [
                    {
                        "id": "CVE-2024-0001",
                        "reason": "accepted",
                        "expires": "2026-06-30",
                        "package": "openssl",
                    }
                ],
            },
        }
    )
    assert spec.scan.severity is Severity.HIGH
    assert spec.scan.allowlist[0].expires == date(2026, 6, 30)
