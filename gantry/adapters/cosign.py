"""Adapter for the ``cosign`` binary: argv builders (pure) and a runner. Prefect-free.

Flags were checked against cosign's source for v2.0 through v3.x
(``cmd/cosign/cli/options``):

* ``--allow-http-registry`` exists from v2.0 (v1 has only ``--allow-insecure-registry``).
  Loopback and private-network registries speak HTTP in cosign without either flag.
* v3 changed two defaults of ``sign``/``attest``: ``--new-bundle-format=true`` (a Sigstore
  bundle through the OCI referrers API instead of the ``sha256-….sig``/``.att`` tags) and
  ``--use-signing-config=true`` (service URLs from TUF, which refuses ``--tlog-upload=false``
  and requires the bundle format). Gantry keeps the tag layout, which its built-in verifier
  reads and every cosign version's ``verify`` finds, so on v3 it passes
  ``--new-bundle-format=false --use-signing-config=false`` (``legacy_layout=False`` lets v3
  write bundles; then only ``--use-signing-config=false`` is added when the tlog is off).
* ``verify``: without a transparency log, ``--insecure-ignore-tlog=true``; v3 falls back to
  the tag layout by itself when the image has no bundles.

Secrets never go on the command line: the key password travels in ``COSIGN_PASSWORD`` and a
keyless identity token in ``SIGSTORE_ID_TOKEN`` (both read by cosign; both names are
redacted from logs and errors by :func:`gantry.proc.run`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from gantry import proc
from gantry.errors import (
    CosignFailedError,
    CosignNetworkError,
    SignatureVerificationError,
    SigningConfigError,
    SigningKeyError,
)

log = logging.getLogger(__name__)

ENV_VAR = "COSIGN_BIN"
#: cosign reads the key password from this variable.
PASSWORD_ENV = "COSIGN_PASSWORD"  # noqa: S105  (a variable name, not a password)
INSTALL_HINT = (
    "install cosign v2 or v3 from the Sigstore project's releases (or your distribution), "
    "or use the built-in signer (`sign.signer: builtin`)"
)
_DIGEST_REF = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, order=True)
class CosignVersion:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> CosignVersion:
        """From ``cosign version [--json]`` output (``gitVersion``/``GitVersion: v2.2.4``)."""
        try:
            doc = json.loads(text)
            text = str(doc.get("gitVersion", text)) if isinstance(doc, dict) else text
        except ValueError:
            pass
        m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
        if m is None:
            raise CosignFailedError(["cosign", "version"], 0, f"unrecognised version: {text[:200]}")
        return cls(int(m[1]), int(m[2]), int(m[3]))

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}"


V2_0 = CosignVersion(2, 0, 0)
V3_0 = CosignVersion(3, 0, 0)


@dataclass(frozen=True)
class SigningKey:
    """What signs (or, for verification, what the signature is checked against)."""

    method: Literal["key", "kms", "keyless"]
    #: key file path (private to sign, public to verify) or KMS URI; None for keyless.
    ref: str | None = None

    def __post_init__(self) -> None:
        if (self.method == "keyless") != (self.ref is None):
            raise SigningConfigError(
                f"signing method {self.method!r} "
                + ("takes no key" if self.method == "keyless" else "needs a key path or KMS URI")
            )


@dataclass(frozen=True)
class RegistryAccess:
    """How cosign may talk to the registry."""

    plain_http: bool = False  #: the registry speaks HTTP, not HTTPS
    skip_tls_verify: bool = False  #: self-signed or expired certificate (testing only)


# --- argv builders (pure) ----------------------------------------------------------------


def registry_flags(access: RegistryAccess, version: CosignVersion) -> list[str]:
    flags: list[str] = []
    if access.plain_http:
        flags.append("--allow-http-registry" if version >= V2_0 else "--allow-insecure-registry")
    if access.skip_tls_verify and "--allow-insecure-registry" not in flags:
        flags.append("--allow-insecure-registry")
    return flags


def _signing_flags(
    key: SigningKey, version: CosignVersion, *, tlog_upload: bool, legacy_layout: bool
) -> list[str]:
    flags: list[str] = []
    if key.ref is not None:
        flags += ["--key", key.ref]
    if not tlog_upload:
        flags.append("--tlog-upload=false")
    if version >= V3_0:
        if legacy_layout:
            flags += ["--new-bundle-format=false", "--use-signing-config=false"]
        elif not tlog_upload:
            flags.append("--use-signing-config=false")
    return flags


def _require_digest(image: str) -> None:
    # Signing by tag signs whatever the tag points at when cosign resolves it: a race.
    if not _DIGEST_REF.search(image):
        raise SigningConfigError(
            f"{image} is not pinned by digest; Gantry signs only REPO@sha256:…",
            fix="resolve the tag to its digest first",
        )


def sign_argv(
    cosign: str,
    image: str,
    *,
    key: SigningKey,
    version: CosignVersion,
    tlog_upload: bool,
    registry: RegistryAccess = RegistryAccess(),
    annotations: Mapping[str, str] | None = None,
    legacy_layout: bool = True,
) -> list[str]:
    """``cosign sign --yes [--key K] [tlog/layout] [registry] [-a k=v] IMAGE@DIGEST``."""
    _require_digest(image)
    argv = [cosign, "sign", "--yes"]
    argv += _signing_flags(key, version, tlog_upload=tlog_upload, legacy_layout=legacy_layout)
    argv += registry_flags(registry, version)
    for k, v in sorted((annotations or {}).items()):
        argv += ["-a", f"{k}={v}"]
    return [*argv, image]


def attest_argv(
    cosign: str,
    image: str,
    *,
    key: SigningKey,
    version: CosignVersion,
    tlog_upload: bool,
    predicate_path: Path,
    predicate_type: str,
    registry: RegistryAccess = RegistryAccess(),
    replace: bool = False,
    legacy_layout: bool = True,
) -> list[str]:
    """``cosign attest --yes [--key K] [flags] --type T --predicate FILE [--replace] IMAGE``."""
    _require_digest(image)
    argv = [cosign, "attest", "--yes"]
    argv += _signing_flags(key, version, tlog_upload=tlog_upload, legacy_layout=legacy_layout)
    argv += ["--type", predicate_type, "--predicate", str(predicate_path)]
    if replace:
        argv.append("--replace")
    argv += registry_flags(registry, version)
    return [*argv, image]


def _verify_key_flags(
    key: SigningKey, certificate_identity: str | None, certificate_oidc_issuer: str | None
) -> list[str]:
    if key.ref is not None:
        return ["--key", key.ref]
    if not (certificate_identity and certificate_oidc_issuer):
        raise SigningConfigError(
            "keyless verification needs the signer's certificate identity and OIDC issuer",
            fix="pass certificate_identity and certificate_oidc_issuer",
        )
    return [
        "--certificate-identity",
        certificate_identity,
        "--certificate-oidc-issuer",
        certificate_oidc_issuer,
    ]


def verify_argv(
    cosign: str,
    image: str,
    *,
    key: SigningKey,
    version: CosignVersion,
    tlog: bool,
    registry: RegistryAccess = RegistryAccess(),
    certificate_identity: str | None = None,
    certificate_oidc_issuer: str | None = None,
) -> list[str]:
    """``cosign verify --key PUB [--insecure-ignore-tlog=true] --output json IMAGE``."""
    argv = [
        cosign,
        "verify",
        *_verify_key_flags(key, certificate_identity, certificate_oidc_issuer),
    ]
    if not tlog:
        argv.append("--insecure-ignore-tlog=true")
    argv += ["--output", "json", *registry_flags(registry, version)]
    return [*argv, image]


def verify_attestation_argv(
    cosign: str,
    image: str,
    *,
    key: SigningKey,
    version: CosignVersion,
    predicate_type: str,
    tlog: bool,
    registry: RegistryAccess = RegistryAccess(),
    certificate_identity: str | None = None,
    certificate_oidc_issuer: str | None = None,
) -> list[str]:
    """``cosign verify-attestation --key PUB --type T [--insecure-ignore-tlog=true] IMAGE``."""
    argv = [
        cosign,
        "verify-attestation",
        *_verify_key_flags(key, certificate_identity, certificate_oidc_issuer),
        "--type",
        predicate_type,
    ]
    if not tlog:
        argv.append("--insecure-ignore-tlog=true")
    argv += registry_flags(registry, version)
    return [*argv, image]


def generate_key_pair_argv(
    cosign: str, *, prefix: str = "cosign", kms: str | None = None
) -> list[str]:
    """``cosign generate-key-pair [--kms URI] --output-key-prefix P`` (run in the target dir)."""
    argv = [cosign, "generate-key-pair"]
    if kms:
        argv += ["--kms", kms]
    return [*argv, "--output-key-prefix", prefix]


def public_key_argv(cosign: str, key_ref: str) -> list[str]:
    """``cosign public-key --key K``: the PEM public key of a key file or KMS key."""
    return [cosign, "public-key", "--key", key_ref]


def version_argv(cosign: str) -> list[str]:
    return [cosign, "version", "--json"]


# --- error mapping -----------------------------------------------------------------------

_NETWORK = re.compile(
    r"connection refused|connection reset|no such host|i/o timeout|tls handshake timeout"
    r"|context deadline exceeded|unexpected eof|server misbehaving|network is unreachable"
    r"|too many requests|status code 5\d\d|\b50[0-4]\b[^\n]*(service|gateway|internal|error)"
    r"|(internal server error|bad gateway|service unavailable|gateway timeout)",
    re.I,
)
_WRONG_PASSWORD = re.compile(r"decrypt(ion)? failed|decrypt: encrypted", re.I)
_NO_KEY = re.compile(r"(reading key|open [^:\n]*(\.key|\.pub)): .*no such file", re.I)
_VERIFY_FAILED = re.compile(
    r"no signatures found|no matching signatures|no matching attestations"
    r"|none of the attestations matched|invalid signature when validating"
    r"|signature not found|failed to verify signature",
    re.I,
)


def error_for(
    argv: Sequence[str],
    returncode: int,
    stderr: str,
    *,
    image: str | None = None,
    password_env: str = PASSWORD_ENV,
) -> Exception:
    """The Gantry error for a failed cosign run, from its exit code and stderr."""
    tail = stderr.strip()[-2000:]
    if _NETWORK.search(tail):
        return CosignNetworkError(
            argv,
            returncode,
            tail,
            fix="check the registry (and Rekor/Fulcio, when used) is reachable; the stage retries",
        )
    if _WRONG_PASSWORD.search(tail):
        return SigningKeyError(
            f"cosign could not decrypt the private key: wrong password ({tail.splitlines()[-1]})",
            fix=f"set ${password_env} to the password the key was created with",
        )
    if _NO_KEY.search(tail):
        return SigningKeyError(
            f"cosign found no key file: {tail.splitlines()[-1]}",
            fix="create a key pair with `gantry keys generate`, or set `sign.key`",
        )
    if image is not None and _VERIFY_FAILED.search(tail):
        return SignatureVerificationError(
            image,
            f"cosign: {tail.splitlines()[-1]}",
            fix="sign the image digest with the matching key, or verify with the signer's "
            "public key",
        )
    return CosignFailedError(argv, returncode, tail)


# --- runner ------------------------------------------------------------------------------


class Cosign:
    """Runs ``cosign`` subcommands through :func:`gantry.proc.run`."""

    def __init__(
        self,
        binary: Path | str,
        *,
        timeout_s: float = 300,
        registry: RegistryAccess = RegistryAccess(),
        legacy_layout: bool = True,
        version: CosignVersion | None = None,
    ) -> None:
        self.binary = str(binary)
        self.timeout_s = timeout_s
        self.registry = registry
        self.legacy_layout = legacy_layout
        self._version = version

    @classmethod
    def find(cls, **kw: Any) -> Cosign:
        """``$COSIGN_BIN``, else ``cosign`` on PATH; ToolNotFoundError when neither."""
        return cls(proc.which("cosign", env_var=ENV_VAR, install_hint=INSTALL_HINT), **kw)

    @staticmethod
    def available() -> bool:
        return bool(os.environ.get(ENV_VAR)) or shutil.which("cosign") is not None

    @cached_property
    def version(self) -> CosignVersion:
        if self._version is not None:
            return self._version
        done = self._run(version_argv(self.binary))
        return CosignVersion.parse(done.stdout or done.stderr)

    def _run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        image: str | None = None,
        password_env: str = PASSWORD_ENV,
    ) -> proc.Completed:
        done = proc.run(argv, timeout_s=self.timeout_s, env=env, cwd=cwd, check=False)
        if done.returncode != 0:
            raise error_for(
                done.argv, done.returncode, done.stderr, image=image, password_env=password_env
            )
        return done

    @staticmethod
    def _secrets_env(password: str | None, identity_token: str | None) -> dict[str, str]:
        env: dict[str, str] = {}
        if password is not None:
            env[PASSWORD_ENV] = password
        if identity_token:
            env["SIGSTORE_ID_TOKEN"] = identity_token
        return env

    def sign(
        self,
        image: str,
        *,
        key: SigningKey,
        password: str | None,
        tlog_upload: bool,
        annotations: Mapping[str, str] | None = None,
        identity_token: str | None = None,
    ) -> None:
        argv = sign_argv(
            self.binary,
            image,
            key=key,
            version=self.version,
            tlog_upload=tlog_upload,
            registry=self.registry,
            annotations=annotations,
            legacy_layout=self.legacy_layout,
        )
        self._run(argv, env=self._secrets_env(password, identity_token))

    def attest(
        self,
        image: str,
        *,
        key: SigningKey,
        password: str | None,
        tlog_upload: bool,
        predicate: bytes,
        predicate_type: str,
        replace: bool = False,
        identity_token: str | None = None,
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="gantry-attest-") as tmp:
            path = Path(tmp) / "predicate.json"
            path.write_bytes(predicate)
            argv = attest_argv(
                self.binary,
                image,
                key=key,
                version=self.version,
                tlog_upload=tlog_upload,
                predicate_path=path,
                predicate_type=predicate_type,
                registry=self.registry,
                replace=replace,
                legacy_layout=self.legacy_layout,
            )
            self._run(argv, env=self._secrets_env(password, identity_token))

    def verify(
        self, image: str, *, key: SigningKey, tlog: bool, **identity: str
    ) -> list[dict[str, Any]]:
        """The verified simple-signing payloads (cosign's ``--output json``)."""
        argv = verify_argv(
            self.binary,
            image,
            key=key,
            version=self.version,
            tlog=tlog,
            registry=self.registry,
            **identity,
        )
        return parse_verify_output(self._run(argv, image=image).stdout)

    def verify_attestation(
        self, image: str, *, key: SigningKey, predicate_type: str, tlog: bool, **identity: str
    ) -> list[dict[str, Any]]:
        """The in-toto statements of the attestations that verified."""
        argv = verify_attestation_argv(
            self.binary,
            image,
            key=key,
            version=self.version,
            predicate_type=predicate_type,
            tlog=tlog,
            registry=self.registry,
            **identity,
        )
        return parse_verify_attestation_output(self._run(argv, image=image).stdout)

    def generate_key_pair(
        self, dest_dir: Path, password: str, *, prefix: str = "cosign"
    ) -> tuple[Path, Path]:
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        priv, pub = dest_dir / f"{prefix}.key", dest_dir / f"{prefix}.pub"
        for p in (priv, pub):
            if p.exists():  # cosign would stop and ask whether to overwrite
                raise SigningKeyError(
                    f"{p} already exists; Gantry does not overwrite keys",
                    fix="remove it first, or write the new pair to another directory",
                )
        self._run(
            generate_key_pair_argv(self.binary, prefix=prefix),
            env=self._secrets_env(password, None),
            cwd=dest_dir,
        )
        return priv, pub

    def public_key(self, key_ref: str, *, password: str | None = None) -> bytes:
        done = self._run(
            public_key_argv(self.binary, key_ref), env=self._secrets_env(password, None)
        )
        return done.stdout.encode()


def parse_verify_output(stdout: str) -> list[dict[str, Any]]:
    """``cosign verify --output json`` prints one JSON array of payloads (maybe after text)."""
    start = stdout.find("[")
    if start < 0:
        raise CosignFailedError(["cosign", "verify"], 0, f"no JSON in output: {stdout[-300:]}")
    try:
        payloads, _ = json.JSONDecoder().raw_decode(stdout[start:])
    except ValueError as exc:
        raise CosignFailedError(["cosign", "verify"], 0, f"unparsable output: {exc}") from None
    return [p for p in payloads if isinstance(p, dict)]


def parse_verify_attestation_output(stdout: str) -> list[dict[str, Any]]:
    """``cosign verify-attestation`` prints one DSSE envelope per line; return the statements."""
    statements: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            env = json.loads(line)
            statement = json.loads(base64.b64decode(env["payload"]))
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(statement, dict):
            statements.append(statement)
    return statements
