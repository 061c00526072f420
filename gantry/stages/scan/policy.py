"""The vulnerability and misconfiguration gate of stage `scan`: pure policy over findings.

``decide`` says, for one image, which findings block the release. Nothing here runs
a scanner or reads a clock: the caller passes the findings and today's date, so every
decision is reproducible from the release record.

Order of the rules: ``ignore_unfixed`` drops vulnerabilities without a fixed version;
allowlist entries then suppress what they match while ``today <= expires`` (an expired
entry suppresses nothing, and is reported); what is left at or above ``severity`` blocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.trivy import Finding
from gantry.spec import AllowlistEntry, ScanOptions, Severity


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Suppression(_Frozen):
    """A finding and the allowlist entry that matches it."""

    finding: Finding
    entry: AllowlistEntry


def severity_counts(findings: Iterable[Finding]) -> dict[str, int]:
    """Findings per severity, every severity present (highest first, for tables)."""
    got = Counter(f.severity for f in findings)
    return {s.value: got.get(s, 0) for s in reversed(Severity)}


def worst_first(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Highest severity first; then by id and package, so output is stable."""
    return tuple(sorted(findings, key=lambda f: (-f.severity.rank, f.id, f.package or "")))


class GateDecision(_Frozen):
    """What the gate decided and why, with every finding accounted for."""

    threshold: Severity
    blocking: tuple[Finding, ...] = Field(description="Counted findings at or above threshold.")
    suppressed: tuple[Suppression, ...] = Field(description="Suppressed by a current entry.")
    expired: tuple[Suppression, ...] = Field(
        description="Matched only by entries past their expiry: they count again."
    )
    ignored_unfixed: tuple[Finding, ...] = Field(
        description="Vulnerabilities without a fix, dropped by ignore_unfixed."
    )
    unused_entries: tuple[AllowlistEntry, ...] = Field(
        description="Allowlist entries that matched no finding (candidates for removal)."
    )
    counts_before: dict[str, int] = Field(description="All findings, per severity.")
    counts_after: dict[str, int] = Field(
        description="Findings still counted after ignore_unfixed and the allowlist."
    )

    @property
    def passed(self) -> bool:
        return not self.blocking

    @property
    def entries_used(self) -> tuple[AllowlistEntry, ...]:
        """Current entries that suppressed at least one finding, in allowlist order."""
        return _unique(s.entry for s in self.suppressed)

    @property
    def entries_expired(self) -> tuple[AllowlistEntry, ...]:
        """Expired entries that would otherwise have suppressed a finding."""
        return _unique(s.entry for s in self.expired)


def _unique(entries: Iterable[AllowlistEntry]) -> tuple[AllowlistEntry, ...]:
    out: list[AllowlistEntry] = []
    for e in entries:
        if e not in out:
            out.append(e)
    return tuple(out)


def decide(findings: Sequence[Finding], options: ScanOptions, today: date) -> GateDecision:
    """Apply ``options`` (threshold, ignore_unfixed, allowlist) to ``findings`` on ``today``."""
    ignored: list[Finding] = []
    suppressed: list[Suppression] = []
    expired: list[Suppression] = []
    counted: list[Finding] = []
    for f in findings:
        if options.ignore_unfixed and f.unfixed:
            ignored.append(f)
            continue
        matching = [e for e in options.allowlist if f.matches(e)]
        active = [e for e in matching if today <= e.expires]
        if active:
            suppressed.append(Suppression(finding=f, entry=active[0]))
            continue
        if matching:
            # Report the entry that lapsed last: it is the one someone has to renew.
            lapsed = max(matching, key=lambda e: e.expires)
            expired.append(Suppression(finding=f, entry=lapsed))
        counted.append(f)
    blocking = [f for f in counted if f.severity.rank >= options.severity.rank]
    unused = tuple(e for e in options.allowlist if not any(f.matches(e) for f in findings))
    return GateDecision(
        threshold=options.severity,
        blocking=worst_first(blocking),
        suppressed=tuple(suppressed),
        expired=tuple(expired),
        ignored_unfixed=tuple(ignored),
        unused_entries=unused,
        counts_before=severity_counts(findings),
        counts_after=severity_counts(counted),
    )


def describe_findings(findings: Sequence[Finding], top: int = 10) -> str:
    """One line per finding (the first ``top``), for error messages and logs."""
    lines = []
    for f in findings[:top]:
        where = f.package or "?"
        if f.kind == "vulnerability":
            fix = f"fixed in {f.fixed_version}" if f.fixed_version else "no fix yet"
            where = f"{where} {f.installed_version or '?'} ({fix})"
        title = f": {f.title}" if f.title else ""
        lines.append(f"  {f.severity.value:<8} {f.id:<16} {where}{title}")
    if len(findings) > top:
        lines.append(f"  … and {len(findings) - top} more (see the scan report)")
    return "\n".join(lines)
