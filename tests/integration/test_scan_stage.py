"""Stage `scan` with the real trivy binary against images in the real (embedded) registry.

The vulnerability DB is a real trivy DB built offline by tests/trivydb.py with planted
findings in packages of debian:bookworm-slim, so the gate is proven end to end: trivy
finds CVE-2099-0001 (gzip, CRITICAL, fixable) and CVE-2099-0002 (tar, HIGH, unfixed) in
an image built FROM debian:bookworm-slim and pushed to the test registry.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest

from gantry.adapters import docker_engine
from gantry.adapters import trivy as trivy_adapter
from gantry.adapters.trivy import Finding
from gantry.errors import ScanPolicyError, VulnDBUnavailableError
from gantry.settings import Settings
from gantry.spec import AllowlistEntry, ScanOptions, Severity, parse_spec
from gantry.stages import scan as scan_stage
from gantry.stages.build import BuildResult, project_root
from gantry.stages.scan import ScanResult, scan_image
from tasks import scan as scan_face
from tests.support import GantryEnv
from tests.trivydb import CRITICAL_FIXED, HIGH_UNFIXED, build_db, push_db_artifact

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)
TODAY = date.today()
RUNTIME_DOCKERFILE = project_root() / "dockerfiles" / "runtime" / "Dockerfile"
BAD_DOCKERFILE = Path(__file__).resolve().parents[1] / "data" / "trivy" / "bad.Dockerfile"


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    c = docker.from_env(timeout=600)
    yield c
    c.close()


@pytest.fixture(scope="module")
def image(
    gantry_env: GantryEnv, client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A small image FROM debian:bookworm-slim in the test registry, by digest."""
    from gantry.localenv.baseimages import ensure_base_image

    settings = Settings.from_env()
    ensure_base_image(
        "debian:bookworm-slim", docker_client=client, work_dir=settings.base_images_dir, log=log
    )
    ctx = tmp_path_factory.mktemp("scan-image")
    (ctx / "Dockerfile").write_text("FROM debian:bookworm-slim\nLABEL ai.gantry.test=scan-stage\n")
    repository = f"{gantry_env.registry}/gantry-test/scan-bookworm"
    docker_engine.build(client, ctx, tag=f"{repository}:1", target=None, labels={}, timeout_s=300)
    digest = docker_engine.push(client, repository, "1", timeout_s=300)
    client.images.remove(f"{repository}:1", noprune=True)  # the registry copy is what counts
    return f"{repository}@{digest}"


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trivy cache dir holding the planted DB (shared: scans never update it)."""
    cache = tmp_path_factory.mktemp("trivy-cache")
    build_db(cache)
    return cache


@pytest.fixture
def no_mirror(gantry_env: GantryEnv) -> str:
    """A DB repository that answers but has no DB: fails the same with or without network."""
    return f"{gantry_env.registry}/gantry-test/no-trivy-db:2"


def _entry(id: str, *, days: int, package: str | None = None) -> AllowlistEntry:
    return AllowlistEntry(
        id=id,
        reason="accepted in the scan-stage test",
        expires=TODAY + timedelta(days=days),
        package=package,
    )


def _ids(findings: Sequence[object]) -> list[str]:
    return [f.id for f in findings if isinstance(f, Finding)]


def test_critical_finding_blocks(image: str, fixture_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ScanPolicyError) as e:
        scan_image(image, RUNTIME_DOCKERFILE, ScanOptions(), tmp_path / "scan", fixture_cache)
    assert _ids(e.value.blocking) == [CRITICAL_FIXED.id]
    text = str(e.value)
    assert f"{image} has 1 finding at or above CRITICAL" in text
    assert "CVE-2099-0001    gzip 1.12-1 (fixed in 1.12-1+deb12u99)" in text
    assert "scan.allowlist" in text and "scan.severity" in text  # the fix is named
    # The reports are on disk even though the gate failed.
    out = tmp_path / "scan"
    report = trivy_adapter.parse_report((out / "vulnerabilities.json").read_text())
    assert {f.id for f in report.vulnerability_findings()} == {CRITICAL_FIXED.id, HIGH_UNFIXED.id}
    assert trivy_adapter.parse_sbom((out / "sbom.cdx.json").read_text()).components
    gate = json.loads((out / "gate.json").read_text())
    assert [f["id"] for f in gate["blocking"]] == [CRITICAL_FIXED.id]


def test_allowlisted_finding_passes_and_is_suppressed(
    image: str, fixture_cache: Path, tmp_path: Path
) -> None:
    entry = _entry(CRITICAL_FIXED.id, days=30, package="gzip")
    options = ScanOptions(allowlist=(entry,))
    result = scan_image(image, RUNTIME_DOCKERFILE, options, tmp_path, fixture_cache)
    assert result.passed and result.blocking == ()
    assert result.vulnerabilities_checked and result.db_status == "fixture"
    assert result.counts["CRITICAL"] == 1 and result.counts["HIGH"] == 1
    assert result.counts_suppressed["CRITICAL"] == 1
    assert result.counts_counted == {"CRITICAL": 0, "HIGH": 1, "MEDIUM": 0, "LOW": 0, "UNKNOWN": 0}
    assert result.allowlist_used == (entry,) and result.allowlist_expired == ()
    assert result.trivy_version == "0.59.1" and result.os == "debian 12.15"
    assert any("test fixture" in w for w in result.warnings)
    # The project's runtime Dockerfile passes trivy's checks at HIGH and CRITICAL.
    assert result.misconfig_counts["HIGH"] == result.misconfig_counts["CRITICAL"] == 0
    assert result.sbom_components > 50 and Path(result.sbom_path).is_file()


def test_expired_allowlist_entry_fails_again(
    image: str, fixture_cache: Path, tmp_path: Path
) -> None:
    expired = _entry(CRITICAL_FIXED.id, days=-1)
    options = ScanOptions(allowlist=(expired,))
    result = scan_stage.run(image, RUNTIME_DOCKERFILE, options, tmp_path, fixture_cache)
    assert not result.passed and _ids(result.blocking) == [CRITICAL_FIXED.id]
    assert result.allowlist_expired == (expired,) and result.allowlist_used == ()
    assert any(f"{CRITICAL_FIXED.id} expired on" in w for w in result.warnings)
    with pytest.raises(ScanPolicyError, match=CRITICAL_FIXED.id):
        scan_stage.enforce(result)
    with pytest.raises(ValueError):
        result.passed = True  # type: ignore[misc]
    assert ScanResult.model_validate_json(result.model_dump_json()) == result
    # Seen from tomorrow's point of view, an entry expiring today has lapsed too.
    today_only = ScanOptions(allowlist=(_entry(CRITICAL_FIXED.id, days=0),))
    assert scan_stage.run(image, RUNTIME_DOCKERFILE, today_only, tmp_path, fixture_cache).passed
    tomorrow = TODAY + timedelta(days=1)
    later = scan_stage.run(
        image, RUNTIME_DOCKERFILE, today_only, tmp_path, fixture_cache, today=tomorrow
    )
    assert not later.passed


def test_high_threshold_and_ignore_unfixed(image: str, fixture_cache: Path, tmp_path: Path) -> None:
    allow_critical = (_entry(CRITICAL_FIXED.id, days=30),)
    strict = ScanOptions(severity=Severity.HIGH, allowlist=allow_critical)
    with pytest.raises(ScanPolicyError) as e:
        scan_image(image, RUNTIME_DOCKERFILE, strict, tmp_path, fixture_cache)
    assert _ids(e.value.blocking) == [HIGH_UNFIXED.id]
    assert "tar 1.34+dfsg-1.2+deb12u1 (no fix yet)" in str(e.value)
    lenient = strict.model_copy(update={"ignore_unfixed": True})
    result = scan_image(image, RUNTIME_DOCKERFILE, lenient, tmp_path, fixture_cache)
    assert result.passed and result.ignored_unfixed == 1


def test_misconfigurations_are_gated(image: str, fixture_cache: Path, tmp_path: Path) -> None:
    allow_cve = _entry(CRITICAL_FIXED.id, days=30)
    with pytest.raises(ScanPolicyError) as e:
        scan_image(
            image, BAD_DOCKERFILE, ScanOptions(allowlist=(allow_cve,)), tmp_path, fixture_cache
        )
    assert _ids(e.value.blocking) == ["AVD-DS-0010"]  # RUN using 'sudo'
    assert "bad.Dockerfile" in str(e.value)
    sudo = _entry("AVD-DS-0010", days=30, package="bad.Dockerfile")
    result = scan_image(
        image, BAD_DOCKERFILE, ScanOptions(allowlist=(allow_cve, sudo)), tmp_path, fixture_cache
    )
    assert result.passed
    assert result.misconfig_counts == {
        "CRITICAL": 1,
        "HIGH": 2,
        "MEDIUM": 2,
        "LOW": 1,
        "UNKNOWN": 0,
    }


def test_runtime_dockerfile_has_no_high_or_critical_misconfiguration(tmp_path: Path) -> None:
    scanner = trivy_adapter.Trivy(trivy_adapter.find_trivy(), tmp_path / "cache", timeout_s=120)
    report = scanner.config_scan(RUNTIME_DOCKERFILE, tmp_path / "config.json")
    findings = report.misconfiguration_findings()
    serious = [f for f in findings if f.severity.rank >= Severity.HIGH.rank]
    assert serious == [], [f"{f.id} {f.severity} {f.title}" for f in serious]
    [result] = report.results
    assert result.misconf_summary is not None and result.misconf_summary.successes > 20
    # Offline by construction: the checks embedded in the binary, no bundle download.
    assert not (tmp_path / "cache" / "policy").exists()


def test_no_db_fails_closed(image: str, no_mirror: str, tmp_path: Path) -> None:
    options = ScanOptions(db_repository=no_mirror)
    with pytest.raises(VulnDBUnavailableError) as e:
        scan_image(image, RUNTIME_DOCKERFILE, options, tmp_path / "out", tmp_path / "cache")
    text = str(e.value)
    assert "fails closed" in text and no_mirror in text and "MANIFEST_UNKNOWN" in text
    assert "scan.allow_offline: true" in text and "--download-db-only" in text
    assert str(tmp_path / "cache") in text
    # The DB-free work was still done and kept.
    assert (tmp_path / "out" / "sbom.cdx.json").is_file()
    assert (tmp_path / "out" / "misconfigurations.json").is_file()
    assert not (tmp_path / "out" / "vulnerabilities.json").exists()


def test_allow_offline_passes_unchecked_and_says_so(
    image: str, no_mirror: str, tmp_path: Path
) -> None:
    options = ScanOptions(db_repository=no_mirror, allow_offline=True)
    result = scan_image(image, RUNTIME_DOCKERFILE, options, tmp_path / "out", tmp_path / "cache")
    assert result.passed and not result.vulnerabilities_checked
    assert result.db_status == "unavailable" and result.db_updated_at is None
    assert result.report_path is None
    assert result.warnings[0].startswith("VULNERABILITIES WERE NOT CHECKED")
    assert "MANIFEST_UNKNOWN" in result.warnings[0]
    assert sum(result.counts.values()) == 0
    markdown = scan_face.summary_markdown(result)
    assert markdown.startswith("# ⚠️ VULNERABILITIES WERE NOT CHECKED")


def test_corrupt_db_fails_closed_unless_offline_is_allowed(image: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (build_db(cache) / "trivy.db").write_bytes(b"not a bbolt file" * 100)
    with pytest.raises(VulnDBUnavailableError, match="failed to open db") as e:
        scan_image(image, RUNTIME_DOCKERFILE, ScanOptions(), tmp_path, cache)
    assert f"delete {cache}/db" in str(e.value)
    result = scan_image(image, RUNTIME_DOCKERFILE, ScanOptions(allow_offline=True), tmp_path, cache)
    assert not result.vulnerabilities_checked and result.db_status == "unavailable"
    assert not (tmp_path / "vulnerabilities.json").exists()
    assert any(w.startswith("VULNERABILITIES WERE NOT CHECKED") for w in result.warnings)


def test_db_is_downloaded_from_a_mirror_then_cached(
    image: str, gantry_env: GantryEnv, no_mirror: str, tmp_path: Path
) -> None:
    published = build_db(tmp_path / "published", fixture=False)
    push_db_artifact(gantry_env.registry, "gantry-test/trivy-db", "2", published)
    mirror = f"{gantry_env.registry}/gantry-test/trivy-db:2"
    cache = tmp_path / "cache"
    fresh = scan_stage.run(
        image, RUNTIME_DOCKERFILE, ScanOptions(db_repository=mirror), tmp_path, cache
    )
    assert fresh.db_status == "fresh" and fresh.vulnerabilities_checked
    assert _ids(fresh.blocking) == [CRITICAL_FIXED.id]
    assert (cache / "db" / "trivy.db").is_file()
    # A current DB is used without asking any repository: the mirror is not even tried.
    again = scan_stage.run(
        image, RUNTIME_DOCKERFILE, ScanOptions(db_repository=no_mirror), tmp_path, cache
    )
    assert again.db_status == "cached" and _ids(again.blocking) == [CRITICAL_FIXED.id]
    assert again.warnings == ()


def test_stale_db_is_used_with_a_warning_when_it_cannot_be_updated(
    image: str, no_mirror: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    old = datetime.now(UTC) - timedelta(days=2)  # within scan.max_db_age_hours (72)
    build_db(cache, fixture=False, updated_at=old)
    result = scan_stage.run(
        image, RUNTIME_DOCKERFILE, ScanOptions(db_repository=no_mirror), tmp_path, cache
    )
    assert result.db_status == "cached" and result.vulnerabilities_checked
    assert result.db_updated_at is not None and result.db_updated_at < old + timedelta(seconds=1)
    assert any("could not be updated" in w for w in result.warnings)
    assert _ids(result.blocking) == [CRITICAL_FIXED.id]


def test_a_db_older_than_max_db_age_hours_does_not_count(
    image: str, no_mirror: str, tmp_path: Path
) -> None:
    """Too old to know what was published since: the scan fails closed (or, allowed to go
    on offline, says it checked nothing) rather than pass on it."""
    from gantry.errors import VulnDBUnavailableError

    cache = tmp_path / "cache"
    build_db(cache, fixture=False, updated_at=datetime.now(UTC) - timedelta(hours=30))
    options = ScanOptions(db_repository=no_mirror, max_db_age_hours=24)
    with pytest.raises(VulnDBUnavailableError, match="built 30 h ago"):
        scan_stage.run(image, RUNTIME_DOCKERFILE, options, tmp_path, cache)
    offline = options.model_copy(update={"allow_offline": True})
    result = scan_stage.run(image, RUNTIME_DOCKERFILE, offline, tmp_path, cache)
    assert not result.vulnerabilities_checked and result.db_status == "unavailable"
    # The same DB within the limit is used, with the warning that it could not be updated.
    within = options.model_copy(update={"max_db_age_hours": 48})
    assert scan_stage.run(image, RUNTIME_DOCKERFILE, within, tmp_path, cache).db_status == "cached"


def test_scan_task_artifacts_and_paths(
    image: str,
    gantry_env: GantryEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Prefect task: reports under the release dir, trivy's cache under the cache dir,
    and artifacts Prefect accepts (checked against its own schema, without a server)."""
    from prefect.client.schemas.actions import ArtifactCreate

    cache_root = tmp_path / "cache"
    monkeypatch.setenv("GANTRY_CACHE_DIR", str(cache_root))
    build_db(cache_root / "trivy")
    artifacts: list[dict[str, Any]] = []

    def capture(kind: str) -> Any:
        def create(**kw: Any) -> None:
            data = kw.get("table", kw.get("markdown"))
            ArtifactCreate(key=kw["key"], type=kind, data=data, description=kw["description"])
            artifacts.append({"type": kind, **kw})

        return create

    monkeypatch.setattr(scan_face, "create_table_artifact", capture("table"))
    monkeypatch.setattr(scan_face, "create_markdown_artifact", capture("markdown"))
    spec = parse_spec(
        {
            "name": "scan-stage",
            "source": {"repo_id": gantry_env.repo_id, "revision": "v1"},
        }
    )
    digest = image.rpartition("@")[2]
    build = BuildResult(
        image=image,
        digest=digest,
        repository=image.rpartition("@")[0],
        tag="1",
        image_id="sha256:" + "0" * 64,
        context_digest="sha256:" + "0" * 64,
        dockerfile=str(RUNTIME_DOCKERFILE),
        base_images=("debian:bookworm-slim",),
        size_bytes=1,
        layers=(),
        labels={},
        build_seconds=0.0,
        cached=False,
    )
    with pytest.raises(ScanPolicyError):
        scan_face.scan_task.fn(spec, build)
    keys = [a["key"] for a in artifacts]
    assert keys == [
        "scan-stage-scan-findings",
        "scan-stage-scan-blocking",
        "scan-stage-scan-summary",
    ]
    by_severity = artifacts[0]["table"]
    assert by_severity[0] == {
        "severity": "CRITICAL",
        "found": 1,
        "counted": 1,
        "suppressed": 0,
        "blocking": 1,
        "of which Dockerfile checks": 0,
    }
    assert artifacts[1]["table"][0]["id"] == CRITICAL_FIXED.id
    assert "**BLOCKED**" in artifacts[2]["markdown"]
    out = Settings.from_env().releases_dir / spec.release_id / "scan"
    assert (out / "sbom.cdx.json").is_file() and (out / "gate.json").is_file()
    assert (cache_root / "trivy" / "fanal").is_dir()  # trivy's cache went where it should
    shutil.rmtree(out)


def test_a_fixture_db_is_never_trusted_outside_the_test_suite(
    image: str, no_mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DB tests/trivydb.py builds (planted findings) outside Gantry's suite: set aside,
    so with no real DB to download the scan fails closed rather than pass on it."""
    from gantry.errors import VulnDBUnavailableError
    from gantry.stages.scan import TRUST_FIXTURE_DB_ENV

    cache = tmp_path / "cache"
    build_db(cache)  # its own copy: the download try must not touch the shared one
    monkeypatch.delenv(TRUST_FIXTURE_DB_ENV)
    with pytest.raises(VulnDBUnavailableError):
        scan_stage.run(
            image, RUNTIME_DOCKERFILE, ScanOptions(db_repository=no_mirror), tmp_path, cache
        )
    offline = ScanOptions(db_repository=no_mirror, allow_offline=True)
    result = scan_stage.run(image, RUNTIME_DOCKERFILE, offline, tmp_path, cache)
    assert not result.vulnerabilities_checked and result.db_status == "unavailable"
    assert any("never used outside Gantry's tests" in w for w in result.warnings)
