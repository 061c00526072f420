"""Stage `scan`, Prefect face: the task and its artifacts (findings tables, a summary that
shouts when vulnerabilities were not checked). The stage is :mod:`gantry.stages.scan`."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from gantry.adapters import trivy
from gantry.spec import ReleaseSpec
from gantry.stages import scan
from gantry.stages.build import BuildResult, runtime_dir
from gantry.stages.scan import ScanResult
from tasks._retry import retry_transient


def severity_table(result: ScanResult) -> list[dict[str, object]]:
    """Findings per severity: found, counted, suppressed, blocking, misconfigurations."""
    return [
        {
            "severity": sev,
            "found": result.counts[sev],
            "counted": result.counts_counted[sev],
            "suppressed": result.counts_suppressed[sev],
            "blocking": result.counts_blocking[sev],
            "of which Dockerfile checks": result.misconfig_counts[sev],
        }
        for sev in result.counts
    ]


def blocking_table(result: ScanResult, top: int = 50) -> list[dict[str, object]]:
    return [
        {
            "severity": f.severity.value,
            "id": f.id,
            "package": f.package or "",
            "installed": f.installed_version or "",
            "fixed": (f.fixed_version or "(no fix)") if f.kind == "vulnerability" else "",
            "title": f.title,
        }
        for f in result.blocking[:top]
    ]


def summary_markdown(result: ScanResult) -> str:
    """The run's scan summary; it shouts when vulnerabilities were not checked."""
    lines: list[str] = []
    if not result.vulnerabilities_checked:
        lines += [
            "# ⚠️ VULNERABILITIES WERE NOT CHECKED",
            "",
            "**No trivy vulnerability DB could be obtained and `scan.allow_offline` is true: "
            "this image passed on Dockerfile checks alone.** Set `scan.db_repository` to a "
            "reachable DB mirror, or pre-seed the cache, and re-run before shipping.",
            "",
        ]
    verdict = "passed" if result.passed else "**BLOCKED**"
    lines += [
        f"## Scan of `{result.image}`: {verdict}",
        "",
        f"- threshold: {result.threshold.value}; DB: {result.db_status}"
        + (f" (built {result.db_updated_at:%Y-%m-%d})" if result.db_updated_at else ""),
        f"- trivy {result.trivy_version}; OS: {result.os or 'unknown'}; "
        f"SBOM: {result.sbom_components} components",
        f"- suppressed by allowlist: {sum(result.counts_suppressed.values())}; "
        f"ignored unfixed: {result.ignored_unfixed}",
    ]
    for e in result.allowlist_expired:
        lines.append(f"- ❗ allowlist entry `{e.id}` expired {e.expires}: it no longer suppresses")
    for w in result.warnings:
        if not w.startswith("VULNERABILITIES WERE NOT CHECKED"):
            lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


@task(name="scan", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_transient)
def scan_task(spec: ReleaseSpec, build: BuildResult) -> ScanResult:
    """Prefect task for stage `scan`; leaves a findings table and a summary artifact."""
    from gantry.settings import get_settings

    settings = get_settings()
    result = scan.run(
        build.image,
        runtime_dir(spec) / "Dockerfile",
        spec.scan,
        settings.releases_dir / spec.release_id / "scan",
        settings.cache_dir / "trivy",
        insecure=settings.registry_is_local or trivy.is_loopback_registry(build.image),
    )
    create_table_artifact(
        key=f"{spec.name}-scan-findings",
        table=severity_table(result),
        description=f"Findings in **{result.image}** by severity (threshold "
        f"{result.threshold.value}; vulnerabilities "
        f"{'checked' if result.vulnerabilities_checked else 'NOT CHECKED'})",
    )
    if result.blocking:
        create_table_artifact(
            key=f"{spec.name}-scan-blocking",
            table=blocking_table(result),
            description=f"Findings blocking **{result.image}**",
        )
    create_markdown_artifact(
        key=f"{spec.name}-scan-summary",
        markdown=summary_markdown(result),
        description="Scan summary",
    )
    scan.enforce(result)
    return result
