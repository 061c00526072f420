"""Stage `scan`: misconfigurations, SBOM and vulnerabilities of the pushed image, then the gate.

The stage's contract (:class:`ScanResult`), the DB policy and :func:`run` live here; the
gate itself is :mod:`gantry.stages.scan.policy`; the Prefect task and its artifacts are
:mod:`tasks.scan`.

The Dockerfile's checks and the SBOM run always: neither needs the vulnerability DB. The
vulnerability scan needs the DB: a cached current one is used as is; otherwise one
download is tried (bounded), and a stale cached DB is used, with a warning, when that
fails. With no DB at all the stage fails closed (VulnDBUnavailableError) unless
``scan.allow_offline``, and then the result, the log and the run's artifact say loudly
that vulnerabilities were not checked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters import trivy
from gantry.adapters.trivy import Finding
from gantry.errors import ScanPolicyError, VulnDBUnavailableError
from gantry.spec import AllowlistEntry, ScanOptions, Severity
from gantry.stages.scan.policy import decide, describe_findings, severity_counts

log = logging.getLogger("gantry.scan")

#: Upper bound of the one DB download attempt (the full DB is ~70 MB compressed).
DB_DOWNLOAD_TIMEOUT_S = 300.0
#: Set by Gantry's own test suite only: a DB made by tests/trivydb.py is trusted there and
#: nowhere else (its planted findings say nothing about a real image).
TRUST_FIXTURE_DB_ENV = "GANTRY_TRUST_FIXTURE_DB"
DBStatus = Literal["fresh", "cached", "unavailable", "fixture"]

REPORT_NAME = "vulnerabilities.json"
SBOM_NAME = "sbom.cdx.json"
CONFIG_REPORT_NAME = "misconfigurations.json"
DECISION_NAME = "gate.json"


class ScanResult(BaseModel):
    """What the scan found and what the gate decided, for the record and the next stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(description="The image scanned, by digest.")
    passed: bool = Field(description="No counted finding at or above the threshold.")
    threshold: Severity
    vulnerabilities_checked: bool = Field(
        description="False only with scan.allow_offline and no vulnerability DB."
    )
    db_status: DBStatus = Field(
        description="fresh: downloaded by this run; cached: already in the cache dir; "
        "unavailable: none could be had; fixture: a test DB (tests/trivydb.py)."
    )
    db_updated_at: datetime | None = Field(description="When the DB's data was built.")
    counts: dict[str, int] = Field(description="All findings per severity.")
    counts_counted: dict[str, int] = Field(
        description="Findings still counted after ignore_unfixed and the allowlist."
    )
    counts_blocking: dict[str, int]
    counts_suppressed: dict[str, int]
    misconfig_counts: dict[str, int] = Field(description="Failed Dockerfile checks per severity.")
    blocking: tuple[Finding, ...] = Field(description="Worst first.")
    ignored_unfixed: int
    allowlist_used: tuple[AllowlistEntry, ...]
    allowlist_expired: tuple[AllowlistEntry, ...] = Field(
        description="Entries past their expiry that matched a finding: it counts again."
    )
    allowlist_unused: tuple[AllowlistEntry, ...]
    sbom_path: str
    sbom_components: int
    report_path: str | None = Field(description="trivy's vulnerability JSON; None if unchecked.")
    config_report_path: str
    decision_path: str
    os: str | None = Field(description="The image's OS as trivy detected it.")
    trivy_version: str
    warnings: tuple[str, ...]
    scan_seconds: float


def _warn(warnings: list[str], text: str) -> None:
    log.warning("%s", text)
    warnings.append(text)


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M} UTC" if t else "at an unknown time"


def _unchecked(warnings: list[str], cause: str) -> None:
    _warn(
        warnings,
        "VULNERABILITIES WERE NOT CHECKED: no usable trivy vulnerability DB could be obtained "
        "and scan.allow_offline is true. Only Dockerfile checks gated this image. "
        f"Cause: {cause.splitlines()[0][:300]}",
    )


def obtain_db(
    scanner: trivy.Trivy,
    options: ScanOptions,
    warnings: list[str],
    *,
    now: datetime | None = None,
) -> tuple[DBStatus, trivy.DBInfo | None]:
    """Make sure a vulnerability DB is in the cache dir; say where it came from.

    A current cached DB is used without touching the network. Otherwise one download is
    tried; if it fails a stale cached DB still serves (with a warning); with none at all
    the scan fails closed, or goes on unchecked when ``options.allow_offline``.
    """
    now = now or datetime.now(UTC)
    cached = trivy.read_db_info(scanner.cache_dir)
    if cached is not None and cached.fixture:
        if fixture_trusted():
            _warn(warnings, f"the vulnerability DB is a test fixture: {cached.fixture}")
            return "fixture", cached
        _warn(
            warnings,
            f"the cached vulnerability DB is a test fixture ({cached.fixture}); it is never "
            "used outside Gantry's tests",
        )
        cached = None
    if cached is not None and cached.is_current(now):
        return "cached", cached
    try:
        log.info(
            "downloading the trivy vulnerability DB from %s into %s",
            options.db_repository or "trivy's default repositories",
            trivy.db_dir(scanner.cache_dir),
        )
        info = scanner.download_db(
            db_repository=options.db_repository,
            timeout_s=min(options.timeout_s, DB_DOWNLOAD_TIMEOUT_S),
        )
        return "fresh", info
    except VulnDBUnavailableError as exc:
        if cached is not None and (age := db_age_hours(cached, now)) > options.max_db_age_hours:
            exc = VulnDBUnavailableError(
                f"the cached DB was built {age:.0f} h ago, more than scan.max_db_age_hours="
                f"{options.max_db_age_hours:g}; and no newer one could be downloaded: "
                f"{exc.message.splitlines()[0][:300]}"
            )
            cached = None
        if cached is not None:
            _warn(
                warnings,
                "the vulnerability DB could not be updated; using the cached one built "
                f"{_when(cached.updated_at)}, which misses anything published since "
                f"({exc.message.splitlines()[0][:300]})",
            )
            return "cached", cached
        if not options.allow_offline:
            raise VulnDBUnavailableError(
                f"no trivy vulnerability DB in {trivy.db_dir(scanner.cache_dir)} and none "
                f"could be downloaded, so the image cannot be checked for vulnerabilities; "
                f"the scan fails closed. {exc.message}",
                fix=(
                    "set scan.db_repository to a reachable mirror of the trivy DB "
                    "(an OCI repository such as <registry>/aquasec/trivy-db:2), pre-seed "
                    f"{scanner.cache_dir} with `trivy image --download-db-only --cache-dir "
                    f"{scanner.cache_dir}` where network access exists, or set "
                    "scan.allow_offline: true to proceed without vulnerability checks"
                ),
            ) from None
        _unchecked(warnings, exc.message)
        return "unavailable", None


def fixture_trusted() -> bool:
    return os.environ.get(TRUST_FIXTURE_DB_ENV) == "1"


def db_age_hours(db: trivy.DBInfo, now: datetime) -> float:
    """How long ago the DB's data was built (unknown: infinitely old)."""
    if db.updated_at is None:
        return float("inf")
    return (now - db.updated_at).total_seconds() / 3600


def stale_because(
    result: ScanResult, options: ScanOptions, now: datetime | None = None
) -> str | None:
    """Why an earlier scan of the same image may not be re-used now, or None.

    The gate decided against that day's date and that DB: an allowlist entry it relied on
    may have expired since, the DB may have grown too old, and a test fixture DB counts
    only in tests. Its files must be on this host: a scan taken over from another host's
    record (several hosts) names that host's files, and `sign` attests the SBOM.
    """
    now = now or datetime.now(UTC)
    files = (result.sbom_path, result.report_path, result.config_report_path, result.decision_path)
    missing = [f for f in files if f and not Path(f).is_file()]
    if missing:
        where = ", ".join(missing)
        return f"its reports are not on this host ({where}): another host scanned, or deleted"
    expired = [e.id for e in result.allowlist_used if e.expires < now.date()]
    if expired:
        return f"allowlist entries it relied on have expired ({', '.join(expired)})"
    if result.db_status == "fixture" and not fixture_trusted():
        return "it was judged with a test fixture DB"
    if result.vulnerabilities_checked:
        if result.db_updated_at is None:
            return "its vulnerability DB's age is unknown"
        age = (now - result.db_updated_at).total_seconds() / 3600
        if age > options.max_db_age_hours:
            return f"its vulnerability DB was built {age:.0f} h ago (scan.max_db_age_hours)"
    return None


def scan_image(
    image: str,
    dockerfile: Path,
    options: ScanOptions,
    out_dir: Path,
    cache_dir: Path,
    *,
    today: date | None = None,
    insecure: bool | None = None,
    binary: Path | None = None,
) -> ScanResult:
    """Scan ``image`` and ``dockerfile``, apply the gate, raise ScanPolicyError if it fails.

    Reports go under ``out_dir`` (``<state>/releases/<release-id>/scan/``), trivy's cache
    and DB under ``cache_dir``. ``insecure`` (plain-HTTP registry): default, only for a
    registry on this machine.
    """
    result = run(
        image,
        dockerfile,
        options,
        out_dir,
        cache_dir,
        today=today,
        insecure=insecure,
        binary=binary,
    )
    enforce(result)
    return result


def run(
    image: str,
    dockerfile: Path,
    options: ScanOptions,
    out_dir: Path,
    cache_dir: Path,
    *,
    today: date | None = None,
    insecure: bool | None = None,
    binary: Path | None = None,
) -> ScanResult:
    """Everything :func:`scan_image` does except raising on the gate's verdict."""
    t0 = time.monotonic()
    today = today or datetime.now(UTC).date()
    if insecure is None:
        insecure = trivy.is_loopback_registry(image)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_NAME, SBOM_NAME, CONFIG_REPORT_NAME, DECISION_NAME):
        (out_dir / name).unlink(missing_ok=True)  # a re-run's reports are its own
    cache_dir.mkdir(parents=True, exist_ok=True)
    scanner = trivy.Trivy(binary or trivy.find_trivy(), cache_dir, timeout_s=options.timeout_s)
    version = scanner.version()
    warnings: list[str] = []

    config_path = out_dir / CONFIG_REPORT_NAME
    config = scanner.config_scan(dockerfile, config_path)
    misconfigs = config.misconfiguration_findings()
    log.info("%s: %d failed Dockerfile checks", dockerfile, len(misconfigs))

    sbom_path = out_dir / SBOM_NAME
    sbom = scanner.sbom(image, sbom_path, insecure=insecure)
    log.info("SBOM of %s: %d components", image, len(sbom.components))

    status, db = obtain_db(scanner, options, warnings)
    report: trivy.Report | None = None
    if db is not None:
        try:
            # The gate applies ignore_unfixed itself (not trivy's --ignore-unfixed), so the
            # record shows what was ignored rather than silently never seeing it.
            report = scanner.vuln_scan(image, out_dir / REPORT_NAME, insecure=insecure)
        except VulnDBUnavailableError as exc:  # e.g. a cached trivy.db trivy cannot open
            if not options.allow_offline:
                raise
            _unchecked(warnings, exc.message)
            status, db = "unavailable", None
    vulns: list[Finding] = []
    os_name: str | None = None
    if report is not None:
        vulns = report.vulnerability_findings()
        if (os_info := report.metadata.os) is not None:
            os_name = f"{os_info.family} {os_info.name}".strip()
            if os_info.eosl:
                _warn(
                    warnings,
                    f"the image's OS ({os_name}) is end-of-life: its vulnerabilities are no "
                    "longer tracked or fixed; move to a supported base image",
                )

    decision = decide([*vulns, *misconfigs], options, today)
    for s in decision.expired:
        _warn(
            warnings,
            f"allowlist entry {s.entry.id} expired on {s.entry.expires}: {s.finding.id} in "
            f"{s.finding.package} counts again",
        )
    decision_path = out_dir / DECISION_NAME
    decision_path.write_text(json.dumps(decision.model_dump(mode="json"), indent=2))

    result = ScanResult(
        image=image,
        passed=decision.passed,
        threshold=options.severity,
        vulnerabilities_checked=report is not None,
        db_status=status,
        db_updated_at=db.updated_at if db else None,
        counts=decision.counts_before,
        counts_counted=decision.counts_after,
        counts_blocking=severity_counts(decision.blocking),
        counts_suppressed=severity_counts(s.finding for s in decision.suppressed),
        misconfig_counts=severity_counts(misconfigs),
        blocking=decision.blocking,
        ignored_unfixed=len(decision.ignored_unfixed),
        allowlist_used=decision.entries_used,
        allowlist_expired=decision.entries_expired,
        allowlist_unused=decision.unused_entries,
        sbom_path=str(sbom_path),
        sbom_components=len(sbom.components),
        report_path=str(out_dir / REPORT_NAME) if report is not None else None,
        config_report_path=str(config_path),
        decision_path=str(decision_path),
        os=os_name,
        trivy_version=version,
        warnings=tuple(warnings),
        scan_seconds=round(time.monotonic() - t0, 2),
    )
    log.info(
        "scan of %s: %s (%s)",
        image,
        "passed" if result.passed else "BLOCKED",
        ", ".join(f"{k} {v}" for k, v in result.counts.items() if v) or "no findings",
    )
    return result


def enforce(result: ScanResult, top: int = 10) -> None:
    """Raise ScanPolicyError when the gate blocked ``result``."""
    if result.passed:
        return
    n = len(result.blocking)
    raise ScanPolicyError(
        f"{result.image} has {n} finding{'s' if n != 1 else ''} at or above "
        f"{result.threshold.value} that no current allowlist entry covers:\n"
        f"{describe_findings(result.blocking, top)}",
        blocking=result.blocking,
    )
