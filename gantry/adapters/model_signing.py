"""Sign and verify weights snapshots with OpenSSF model-signing. Prefect-free.

A signature is a Sigstore bundle JSON written by model-signing: a DSSE envelope over an
in-toto statement that lists every file of the snapshot with its sha256. It is stored
*beside* the snapshot (``<snapshot>.sig.json``, next to ``<snapshot>.manifest.json``),
never inside it: the snapshot is mounted read-only into containers, and a file inside it
would change what is signed.

Keys (method ``key``): EC P-256 in PEM. The private key is PKCS#8, encrypted (PBES2,
AES-256) when a password is given, mode 0600; the public key is SubjectPublicKeyInfo.
model-signing loads them with cryptography's ``load_pem_private_key``/``load_pem_public_key``
so it also reads traditional ``EC PRIVATE KEY`` PEM and P-384/P-521 keys. Its
``use_elliptic_key_signer(password=...)`` is annotated ``str`` but hands the value to
cryptography unchanged, which needs bytes (a ``str`` raises TypeError in 1.1.1): we pass
UTF-8 bytes. cosign's own key format (scrypt + secretbox) is *not* readable by it, so the
weights key pair is separate from the image signing key.

Hashing: one sha256 per file (so the signed digests equal the WeightsManifest's), symlinks
refused (snapshots are hard-link trees; a symlink could point outside), and the top-level
``.cache`` and ``.git`` directories ignored: tools (huggingface_hub, git) drop metadata
there that is not part of the weights.

Keyless (method ``keyless``) goes through model-signing's Sigstore signer. It needs
network access to Sigstore (TUF, the OIDC issuer, Fulcio, Rekor) and an OIDC identity
token: it is untested against real Sigstore here. It never starts the interactive
browser flow, and every network phase runs under a deadline (Fulcio/Rekor requests carry
no timeout of their own), so no network means a prompt SigstoreUnavailableError.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import requests
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing, verifying
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sigstore import errors as sigstore_errors
from sigstore import oidc as sigstore_oidc

from gantry.atomicfile import write_atomic
from gantry.errors import SigstoreUnavailableError, WeightsKeyError, WeightsSignatureError
from gantry.manifest import WeightsManifest

log = logging.getLogger("gantry.signing")

T = TypeVar("T")

PRIVATE_KEY_NAME = "weights.key"
PUBLIC_KEY_NAME = "weights.pub"
#: Top-level paths of a snapshot that are never signed (tool metadata, not weights).
IGNORED_PATHS = (".cache", ".git")
_CURVES = {"secp256r1", "secp384r1", "secp521r1"}  # the curves model-signing accepts
# Keyless: the time a hash may take on top of the network deadline (a slow disk's pace).
_HASH_BYTES_PER_S = 50 * 2**20
_KEYGEN_FIX = (
    "create a pair with `gantry keys generate` (weights.key, weights.pub) or point sign.key "
    "at the private key"
)


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WeightsSignature(_Result):
    """A signature over a weights snapshot, as written (or found valid) beside it."""

    path: str = Field(description="The Sigstore bundle JSON, beside the snapshot.")
    snapshot: str
    method: Literal["key", "keyless"]
    public_key_fingerprint: str | None = Field(
        description="sha256:<hex> of the DER public key (method `key`)."
    )
    identity: str | None = Field(description="The OIDC identity that signed (method `keyless`).")
    files: int = Field(description="Files covered by the signature.")
    content_digest: str = Field(description="model-signing's digest over all file digests.")
    manifest_digest: str | None = Field(
        description="Digest of the WeightsManifest the signed files were checked against."
    )
    model_signing_version: str
    signed_at: datetime = Field(description="When it was signed (the file's mtime if reused).")
    reused: bool = Field(description="True when a valid signature by this key already existed.")
    sign_seconds: float


class VerifiedWeights(_Result):
    """A snapshot whose every file matches a signature by the expected key or identity."""

    snapshot: str
    signature_path: str
    method: Literal["key", "keyless"]
    public_key_fingerprint: str | None
    identity: str | None
    files: int
    content_digest: str
    manifest_digest: str | None
    verify_seconds: float


class KeylessOptions(_Result):
    """How to obtain a Sigstore signing certificate (method `keyless`)."""

    identity_token: SecretStr | None = Field(
        default=None, description="An OIDC token; takes precedence over ambient credentials."
    )
    use_ambient_credentials: bool = Field(
        default=True, description="Detect a CI workload identity (GitHub Actions, GCP …)."
    )
    oidc_issuer: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    use_staging: bool = False
    trust_config: Path | None = Field(
        default=None, description="A ClientTrustConfig JSON (private Sigstore); skips TUF."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Deadline per network phase.")


class KeylessIdentity(_Result):
    """Who must have signed (method `keyless`)."""

    identity: str = Field(description="e.g. the signer's e-mail or CI workflow URI.")
    oidc_issuer: str = Field(description="e.g. https://token.actions.githubusercontent.com")
    use_staging: bool = False
    trust_config: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)


# --- keys -------------------------------------------------------------------------------


def generate_weights_key(dest_dir: Path, password: str | None) -> tuple[Path, Path]:
    """Create ``weights.key`` (EC P-256, PKCS#8 PEM, mode 0600) and ``weights.pub``.

    The private key is encrypted when ``password`` is non-empty. An existing key is never
    overwritten: signatures made with it would stop verifying.
    """
    priv, pub = dest_dir / PRIVATE_KEY_NAME, dest_dir / PUBLIC_KEY_NAME
    if existing := [str(p) for p in (priv, pub) if p.exists()]:
        raise WeightsKeyError(
            f"weights key file(s) already exist: {', '.join(existing)}",
            fix="use the existing pair, or move both files away to make a new one (weights "
            "signed with the old key then verify only with the old weights.pub)",
        )
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_atomic(priv, pem, mode=0o600)
    write_atomic(pub, _public_pem(key.public_key()), mode=0o644)
    log.info("weights key pair %s, %s (%s)", priv, pub, fingerprint(key.public_key()))
    return priv, pub


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """sha256:<hex> of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_private_key(
    path: Path, password: str | None, password_env: str | None
) -> tuple[ec.EllipticCurvePrivateKey, bytes | None]:
    """The key and the password bytes that open it (None when it is not encrypted)."""
    var = f"${password_env}" if password_env else "the password"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsKeyError(
            f"weights signing key {path} does not exist", fix=_KEYGEN_FIX
        ) from None
    # PKCS#8 and traditional OpenSSL PEM mark encryption in their armour, outside the base64.
    encrypted = (
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    )
    if encrypted and not password:
        raise WeightsKeyError(
            f"weights signing key {path} is encrypted and no password was given",
            fix=f"set {password_env or 'the password variable (sign.password_env)'} to "
            "the key's password",
        )
    # A password set for the image key must not break an unencrypted weights key.
    secret = password.encode() if encrypted and password else None
    try:
        key = serialization.load_pem_private_key(data, secret)
    except ValueError as exc:
        if encrypted:
            raise WeightsKeyError(
                f"wrong password for weights signing key {path} ({exc})",
                fix=f"set {var} to the password the key was created with",
            ) from None
        raise WeightsKeyError(f"{path} is not a PEM private key ({exc})", fix=_KEYGEN_FIX) from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise WeightsKeyError(f"cannot load {path}: {exc}", fix=_KEYGEN_FIX) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVES:
        raise WeightsKeyError(
            f"{path} is not an EC P-256/P-384/P-521 key, the only kinds model-signing uses",
            fix=_KEYGEN_FIX,
        )
    return key, secret


def _load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise WeightsKeyError(
            f"weights public key {path} does not exist",
            fix="pass the weights.pub made with the signing key (`gantry keys generate`)",
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise WeightsKeyError(
            f"{path} is not a PEM public key ({exc})",
            fix="pass the weights.pub made with the signing key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise WeightsKeyError(
            f"{path} is not an EC P-256/P-384/P-521 public key",
            fix="pass the weights.pub made with the signing key",
        )
    return key


# --- sign -------------------------------------------------------------------------------


def sign_weights(
    snapshot: Path,
    *,
    private_key: Path | None,
    password: str | None,
    signature_path: Path,
    method: Literal["key", "keyless"] = "key",
    keyless: KeylessOptions | None = None,
    manifest: WeightsManifest | None = None,
    password_env: str | None = None,
) -> WeightsSignature:
    """Sign every file of ``snapshot`` into ``signature_path`` (atomically, beside it).

    Method ``key``: a valid signature by the same key over the same content is kept and
    returned with ``reused=True``. With ``manifest``, the signed digests must equal the
    manifest's, so only the weights the release verified get signed. ``password_env`` only
    names the variable in error messages.
    """
    t0 = time.monotonic()
    _check_layout(snapshot, signature_path)
    if method == "keyless":
        return _sign_keyless(snapshot, signature_path, keyless or KeylessOptions(), manifest, t0)
    if private_key is None:
        raise WeightsKeyError("method `key` needs a private key", fix=_KEYGEN_FIX)
    key, secret = _load_private_key(private_key, password, password_env)
    fp = fingerprint(key.public_key())

    if signature_path.is_file():
        with tempfile.TemporaryDirectory(prefix="gantry-pub-") as tmp:
            pub = Path(tmp) / PUBLIC_KEY_NAME
            pub.write_bytes(_public_pem(key.public_key()))
            try:
                found = verify_weights(
                    snapshot, signature_path=signature_path, public_key=pub, manifest=manifest
                )
            except WeightsSignatureError as exc:
                log.info("re-signing %s: %s", snapshot, exc.message)
            else:
                log.info("weights %s already signed by %s; reusing", snapshot, fp)
                mtime = signature_path.stat().st_mtime
                return _signature(
                    signature_path,
                    snapshot,
                    "key",
                    fp,
                    None,
                    _Signed(found.files, found.content_digest, {}),
                    found.manifest_digest,
                    datetime.fromtimestamp(mtime, UTC),
                    reused=True,
                    t0=t0,
                )

    # The password goes as bytes: model-signing passes it to cryptography, which needs them.
    config = signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
        private_key=private_key,
        password=secret,  # type: ignore[arg-type]
    )
    config.set_hashing_config(_hashing_config())
    bundle = _sign_into_bytes(lambda out: config.sign(snapshot, out), snapshot)
    signed = _parse_bundle(bundle, signature_path)
    manifest_digest = _check_manifest(signed, manifest, snapshot)
    write_atomic(signature_path, bundle, mode=0o644)
    log.info("signed %d files of %s with %s", len(signed.digests), snapshot, fp)
    return _signature(
        signature_path,
        snapshot,
        "key",
        fp,
        None,
        signed,
        manifest_digest,
        datetime.now(UTC),
        reused=False,
        t0=t0,
    )


def _sign_keyless(
    snapshot: Path,
    signature_path: Path,
    opts: KeylessOptions,
    manifest: WeightsManifest | None,
    t0: float,
) -> WeightsSignature:
    client_id = opts.client_id or "sigstore"
    token = opts.identity_token.get_secret_value() if opts.identity_token else None
    with _sigstore_errors():
        if token is None and opts.use_ambient_credentials:
            token = _with_deadline(
                lambda: sigstore_oidc.detect_credential(client_id),
                opts.timeout_s,
                "detecting ambient OIDC credentials",
            )
        if token is None:
            # Without a token model-signing would open a browser and wait for a human.
            raise WeightsKeyError(
                "keyless signing needs an OIDC identity token and none was given or detected",
                fix="pass identity_token (e.g. from $SIGSTORE_ID_TOKEN), run where ambient "
                "credentials exist (GitHub Actions with `id-token: write`, GCP workload "
                "identity), or use sign.method `key` offline",
            )
        identity = sigstore_oidc.IdentityToken(token, client_id).identity  # local, no network
        raw_token = token
        config = _with_deadline(
            lambda: signing.Config().use_sigstore_signer(  # type: ignore[no-untyped-call]
                identity_token=raw_token,
                oidc_issuer=opts.oidc_issuer,
                use_ambient_credentials=False,
                use_staging=opts.use_staging,
                client_id=opts.client_id,
                client_secret=(
                    opts.client_secret.get_secret_value() if opts.client_secret else None
                ),
                trust_config=opts.trust_config,
            ),
            opts.timeout_s,
            "loading the Sigstore trust root and OIDC configuration",
        )
        config.set_hashing_config(_hashing_config())
        size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
        bundle = _with_deadline(
            lambda: _sign_into_bytes(lambda out: config.sign(snapshot, out), snapshot),
            opts.timeout_s + size / _HASH_BYTES_PER_S,
            "hashing and getting a certificate from Fulcio and a Rekor entry",
        )
    signed = _parse_bundle(bundle, signature_path)
    manifest_digest = _check_manifest(signed, manifest, snapshot)
    write_atomic(signature_path, bundle, mode=0o644)
    log.info("signed %d files of %s keyless as %s", len(signed.digests), snapshot, identity)
    return _signature(
        signature_path,
        snapshot,
        "keyless",
        None,
        identity,
        signed,
        manifest_digest,
        datetime.now(UTC),
        reused=False,
        t0=t0,
    )


def _sign_into_bytes(sign: Callable[[Path], None], snapshot: Path) -> bytes:
    """Run a model-signing ``sign`` into a private temp dir and return the bundle bytes.

    model-signing writes the file non-atomically; a private directory keeps a half-written
    or abandoned (timed-out keyless) bundle away from the real signature path.
    """
    with tempfile.TemporaryDirectory(prefix="gantry-sig-") as tmp:
        out = Path(tmp) / "bundle.json"
        with _hashing_errors(snapshot):
            sign(out)
        return out.read_bytes()


def _signature(
    path: Path,
    snapshot: Path,
    method: Literal["key", "keyless"],
    fp: str | None,
    identity: str | None,
    signed: _Signed,
    manifest_digest: str | None,
    signed_at: datetime,
    *,
    reused: bool,
    t0: float,
) -> WeightsSignature:
    return WeightsSignature(
        path=str(path),
        snapshot=str(snapshot),
        method=method,
        public_key_fingerprint=fp,
        identity=identity,
        files=signed.files,
        content_digest=signed.root,
        manifest_digest=manifest_digest,
        model_signing_version=metadata.version("model-signing"),
        signed_at=signed_at,
        reused=reused,
        sign_seconds=round(time.monotonic() - t0, 3),
    )


# --- verify -----------------------------------------------------------------------------


def verify_weights(
    snapshot: Path,
    *,
    signature_path: Path,
    public_key: Path | None = None,
    identity: KeylessIdentity | None = None,
    manifest: WeightsManifest | None = None,
) -> VerifiedWeights:
    """Check that ``snapshot`` holds exactly the signed files, signed by the expected key.

    Give ``public_key`` (method `key`) or ``identity`` (method `keyless`). Raises
    WeightsSignatureError naming the cause, and the files when content differs.
    """
    t0 = time.monotonic()
    if (public_key is None) == (identity is None):
        raise ValueError("give exactly one of public_key and identity")
    if not signature_path.is_file():
        raise WeightsSignatureError(
            f"the weights {snapshot} have no signature: {signature_path} does not exist",
            reason="missing",
            fix="re-run the release's sign stage, which writes it beside the snapshot",
        )
    if not snapshot.is_dir():
        raise WeightsSignatureError(
            f"the signed weights {snapshot} are gone",
            reason="content",
            fix="re-run the release: the weights stage downloads them again",
        )
    fp: str | None = None
    if public_key is not None:
        fp = fingerprint(_load_public_key(public_key))
        config = verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
            public_key=public_key
        )
        signer = f"{public_key} ({fp})"
    else:
        assert identity is not None
        with _sigstore_errors():
            config = _with_deadline(
                lambda: verifying.Config().use_sigstore_verifier(  # type: ignore[no-untyped-call]
                    identity=identity.identity,
                    oidc_issuer=identity.oidc_issuer,
                    use_staging=identity.use_staging,
                    trust_config=identity.trust_config,
                ),
                identity.timeout_s,
                "loading the Sigstore trust root",
            )
        signer = f"{identity.identity} (issuer {identity.oidc_issuer})"
    config.set_hashing_config(_hashing_config())
    try:
        with _hashing_errors(snapshot):
            config.verify(snapshot, signature_path)
    except (WeightsSignatureError, OSError):
        raise  # already explained, or a disk problem that is no signature's fault
    except Exception as exc:
        raise _verify_error(exc, snapshot, signature_path, signer) from None
    signed = _parse_bundle(signature_path.read_bytes(), signature_path)
    manifest_digest = _check_manifest(signed, manifest, snapshot)
    return VerifiedWeights(
        snapshot=str(snapshot),
        signature_path=str(signature_path),
        method="key" if public_key is not None else "keyless",
        public_key_fingerprint=fp,
        identity=identity.identity if identity else None,
        files=signed.files,
        content_digest=signed.root,
        manifest_digest=manifest_digest,
        verify_seconds=round(time.monotonic() - t0, 3),
    )


_DIFF_PREFIX = "Signature mismatch: "
_CHANGED = re.compile(r"Hash mismatch for '(.+?)': Expected ", re.S)
_ADDED = re.compile(r"Extra files found in model '[^']*': (.*)", re.S)
_REMOVED = re.compile(r"Missing files in model '[^']*': (.*)", re.S)
_RESIGN = "re-run the release's sign stage to sign the weights again"


def _verify_error(
    exc: Exception, snapshot: Path, signature_path: Path, signer: str
) -> WeightsSignatureError:
    """Turn model-signing's (ValueError-only) verification failures into one that says why."""
    text = str(exc)
    if text.startswith(_DIFF_PREFIX):
        return _content_error(_parse_diff(text[len(_DIFF_PREFIX) :]), snapshot, "its signature")
    if text.startswith("Key mismatch"):
        return WeightsSignatureError(
            f"{signature_path} was signed with another key, not {signer}",
            reason="wrong_key",
            fix="verify with the weights.pub of the key that signed, or " + _RESIGN,
        )
    if isinstance(exc, InvalidSignature | sigstore_errors.VerificationError):
        return WeightsSignatureError(
            f"{signature_path} does not verify as signed by {signer}: it was edited after "
            f"signing, or made by another signer{f' ({text})' if text else ''}",
            reason="invalid",
            fix=f"{_RESIGN}; if the signer did not change, treat the signature as tampered",
        )
    return WeightsSignatureError(
        f"{signature_path} is not a signature this verifier reads "
        f"({type(exc).__name__}: {text[:300]})",
        reason="malformed",
        fix=f"{_RESIGN}; a keyless signature is verified with `identity`, a key one with "
        "`public_key`",
    )


class _Diff(NamedTuple):
    changed: list[str]
    added: list[str]
    removed: list[str]


def _parse_diff(listing: str) -> _Diff:
    """Parse model-signing's ``Signature mismatch: [..]`` (a Python list repr of lines)."""
    try:
        parsed = ast.literal_eval(listing)
        lines = [str(x) for x in parsed] if isinstance(parsed, list) else [listing]
    except (ValueError, SyntaxError):
        lines = [listing]
    diff = _Diff([], [], [])
    for line in lines:
        if m := _CHANGED.match(line):
            diff.changed.append(m[1])
        elif m := _ADDED.match(line):
            diff.added.extend(m[1].split(", "))
        elif m := _REMOVED.match(line):
            diff.removed.extend(m[1].split(", "))
    return diff


def _content_error(diff: _Diff, snapshot: Path, against: str) -> WeightsSignatureError:
    def few(names: list[str]) -> str:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return ", ".join(names[:5]) + more

    parts = []
    if diff.changed:
        parts.append(f"changed: {few(diff.changed)}")
    if diff.removed:
        parts.append(f"removed: {few(diff.removed)}")
    if diff.added:
        parts.append(f"added (not in {against}): {few(diff.added)}")
    what = "; ".join(parts) or "the file listing differs"
    return WeightsSignatureError(
        f"the weights in {snapshot} differ from {against}: {what}",
        reason="content",
        changed=diff.changed,
        added=diff.added,
        removed=diff.removed,
        fix=f"do not use these files: delete {snapshot} and "
        f"{snapshot.with_name(snapshot.name + '.manifest.json')}, then re-run the release to "
        "download, verify and sign them again",
    )


# --- shared -----------------------------------------------------------------------------


class _Signed(NamedTuple):
    files: int
    root: str
    digests: dict[str, str]  # path -> sha256 hex


def _parse_bundle(bundle: bytes, where: Path) -> _Signed:
    """The file digests a bundle's in-toto statement lists (read after verification)."""
    try:
        doc = json.loads(bundle)
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
        resources = statement["predicate"]["resources"]
        digests = {
            str(r["name"]): str(r["digest"]) for r in resources if r["algorithm"] == "sha256"
        }
        root = "sha256:" + str(statement["subject"][0]["digest"]["sha256"])
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
        raise WeightsSignatureError(
            f"{where} is not a model-signing bundle ({type(exc).__name__}: {exc})",
            reason="malformed",
            fix=_RESIGN,
        ) from None
    return _Signed(len(resources), root, digests)


def _check_manifest(
    signed: _Signed, manifest: WeightsManifest | None, snapshot: Path
) -> str | None:
    """Require the signed file digests to be the manifest's; its digest, or None."""
    if manifest is None:
        return None
    want = {e.path: e.sha256 for e in manifest.files}
    if signed.digests != want:
        diff = _Diff(
            changed=sorted(
                p for p in want.keys() & signed.digests.keys() if want[p] != signed.digests[p]
            ),
            added=sorted(signed.digests.keys() - want.keys()),
            removed=sorted(want.keys() - signed.digests.keys()),
        )
        raise _content_error(diff, snapshot, "their manifest")
    return manifest.digest


def _hashing_config() -> hashing.Config:
    # sha256 per file, pinned: the signed digests are then comparable with the manifest's.
    return (
        hashing.Config()  # type: ignore[no-untyped-call]
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=IGNORED_PATHS, ignore_git_paths=False)
    )


@contextmanager
def _hashing_errors(snapshot: Path) -> Iterator[None]:
    """model-signing refuses symlinks and special files with a ValueError; say what to do."""
    try:
        yield
    except ValueError as exc:
        if not str(exc).startswith("Cannot use "):
            raise
        raise WeightsSignatureError(
            f"cannot sign or verify {snapshot}: {exc}",
            reason="unsupported",
            fix=f"a snapshot holds regular files (hard links) only: delete {snapshot} and its "
            "manifest and re-run the release",
        ) from None


@contextmanager
def _sigstore_errors() -> Iterator[None]:
    try:
        yield
    except (
        sigstore_errors.NetworkError,
        sigstore_errors.TUFError,
        requests.RequestException,
    ) as exc:
        raise SigstoreUnavailableError(
            f"cannot reach Sigstore: {exc}",
            fix="keyless signing needs network access to Sigstore's TUF repository, OIDC "
            "issuer, Fulcio and Rekor; use sign.method `key` where there is none",
        ) from None
    except (sigstore_oidc.IdentityError, sigstore_oidc.IssuerError) as exc:
        raise WeightsKeyError(
            f"the OIDC identity was refused: {exc}",
            fix="pass a fresh identity token (they expire within minutes) with audience "
            "`sigstore`, or fix the OIDC issuer",
        ) from None
    except sigstore_errors.Error as exc:  # e.g. Fulcio refusing the token's identity
        raise WeightsKeyError(
            f"Sigstore refused to sign: {exc}",
            fix="check the identity token, OIDC issuer and trust config of the keyless options",
        ) from None


def _with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; give up after ``timeout_s`` (the thread is abandoned).

    Sigstore's Fulcio and Rekor requests have no timeout of their own, and a socket-wide
    default would leak into the rest of the process.
    """
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, name="gantry-sigstore", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise SigstoreUnavailableError(
            f"Sigstore did not answer in time: {what} took more than {timeout_s:.0f}s",
            fix="check network access to Sigstore (TUF, OIDC issuer, Fulcio, Rekor) or raise "
            "the keyless timeout; use sign.method `key` where there is no network",
        )
    if errors:
        raise errors[0]
    return box["value"]


def _check_layout(snapshot: Path, signature_path: Path) -> None:
    if not snapshot.is_dir():
        raise WeightsSignatureError(
            f"cannot sign {snapshot}: it is not a directory",
            reason="content",
            fix="run the weights stage first; it builds the snapshot",
        )
    if signature_path.resolve().is_relative_to(snapshot.resolve()):
        # Inside, it would be signed itself (changing what is signed) and mounted read-only.
        raise ValueError(f"signature path {signature_path} must be outside {snapshot}")
