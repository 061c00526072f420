"""Image signing for a release: sign, attest and verify, with cosign or the built-in signer.

``SignOptions.signer`` picks the implementation: ``cosign`` (the binary, ``$COSIGN_BIN`` or
PATH), ``builtin`` (:mod:`gantry.signing.simple`, same registry layout, no transparency
log, key files only), or ``auto``: cosign when installed, else built-in. Both sign by
digest: a tag is resolved once, first, so what is signed is what was resolved.

The key password comes from the environment variable ``SignOptions.password_env`` through
``password_provider``; a provider reading a Prefect Secret block can be passed instead
(the hook for workers that get secrets from Prefect). An unset variable means the empty
password, as in cosign.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.cosign import Cosign, RegistryAccess, SigningKey
from gantry.adapters.registry import RegistryClient, is_loopback
from gantry.errors import CosignError, SigningConfigError, SigningKeyError
from gantry.signing import keys, simple
from gantry.spec import SignOptions

log = logging.getLogger(__name__)

Signer = Literal["builtin", "cosign"]
#: Returns the key password for ``options`` (None: not set).
PasswordProvider = Callable[[SignOptions], str | None]


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageSignature(_Result):
    """An image signed by digest, and where its signature is."""

    image: str = Field(description="<registry>/<repository>@sha256:…, what was signed.")
    digest: str
    signature_tag: str = Field(description="Tag of the signature manifest, sha256-<hex>.sig.")
    signature_ref: str = Field(description="<registry>/<repository>:sha256-<hex>.sig")
    signer: Signer
    key_id: str | None = Field(
        description="sha256 (hex) of the public key's DER SubjectPublicKeyInfo; None keyless."
    )
    public_key_path: str | None = Field(description="The .pub file that verifies it, if any.")
    tlog: bool = Field(description="Whether the signature was recorded in Rekor.")
    signature_manifest_digest: str | None = Field(
        default=None, description="Digest of the .sig manifest after signing (built-in only)."
    )
    newly_signed: bool | None = Field(
        default=None,
        description="False when this key had already signed this digest (built-in only).",
    )


class AttestationRef(_Result):
    """A signed in-toto statement attached to an image."""

    image: str
    digest: str
    predicate_type: str = Field(description="The predicate type URI.")
    attestation_tag: str = Field(description="sha256-<hex>.att")
    reference: str = Field(description="<registry>/<repository>:sha256-<hex>.att")
    signer: Signer
    key_id: str | None
    tlog: bool
    envelope_digest: str | None = Field(
        default=None, description="Digest of the DSSE envelope blob (built-in only)."
    )


class VerifiedSignature(_Result):
    """Signatures of an image that verified with a public key."""

    image: str = Field(description="<registry>/<repository>@sha256:… that was verified.")
    digest: str
    signature_ref: str = Field(description="<registry>/<repository>:sha256-<hex>.sig")
    signer: Signer = Field(description="Which implementation verified it.")
    key_id: str | None = Field(description="The public key's id; None for KMS and keyless.")
    payloads: tuple[dict[str, Any], ...] = Field(description="The signed payloads.")


class VerifiedAttestation(_Result):
    """Attestations of an image, of one predicate type, that verified with a public key."""

    image: str
    digest: str
    reference: str = Field(description="<registry>/<repository>:sha256-<hex>.att")
    signer: Signer = Field(description="Which implementation verified it.")
    key_id: str | None
    predicate_type: str
    statements: tuple[dict[str, Any], ...] = Field(description="The in-toto statements.")


def env_password(options: SignOptions) -> str | None:
    """The default :data:`PasswordProvider`: ``$<options.password_env>``."""
    return os.environ.get(options.password_env)


def choose_signer(options: SignOptions) -> Signer:
    """``options.signer``, with ``auto`` resolved: cosign when installed, else built-in."""
    if options.signer != "auto":
        return options.signer
    chosen: Signer = "cosign" if Cosign.available() else "builtin"
    # Said once per process: every sign/attest/verify call resolves it again.
    if chosen not in _ANNOUNCED:
        _ANNOUNCED.add(chosen)
        log.info(
            "sign.signer is auto: using the %s signer (%s)",
            chosen,
            "cosign is installed" if chosen == "cosign" else "cosign is not installed",
        )
    return chosen


_ANNOUNCED: set[str] = set()


def key_paths(options: SignOptions, key_dir: Path) -> tuple[Path, Path]:
    """The private key file and its ``.pub`` sibling (cosign's naming).

    ``options.key`` when set; else ``key_dir`` itself when it names a key file (``*.key``),
    else ``key_dir/cosign.key``.
    """
    if options.key:
        priv = Path(options.key).expanduser()
    elif key_dir.suffix == ".key" or key_dir.is_file():
        priv = key_dir
    else:
        priv = key_dir / "cosign.key"
    return priv, priv.with_suffix(".pub")


def generate_keypair(dest_dir: Path, password: str, *, prefix: str = "cosign") -> tuple[Path, Path]:
    """Write a cosign-format key pair (``<prefix>.key`` 0600, ``<prefix>.pub``)."""
    return keys.generate_keypair(dest_dir, password, prefix=prefix)


# --- helpers -----------------------------------------------------------------------------


def _registry(ref: simple.ImageRef) -> RegistryClient:
    return RegistryClient(ref.registry)


def registry_access(registry: str) -> RegistryAccess:
    """How cosign reaches ``registry`` (``host[:port]``): plain HTTP only on loopback."""
    return RegistryAccess(plain_http=is_loopback(registry))


def _cosign(registry: RegistryClient, cosign: Cosign | None) -> Cosign:
    if cosign is not None:
        return cosign
    return Cosign.find(registry=registry_access(registry.address))


def _require_key_file(path: Path) -> None:
    if not path.is_file():
        raise SigningKeyError(
            f"private key {path} does not exist",
            fix=f"{keys.GENERATE_HINT}, or point `sign.key` at an existing cosign key",
        )


def _load_builtin_key(
    path: Path, options: SignOptions, password_provider: PasswordProvider
) -> ec.EllipticCurvePrivateKey:
    _require_key_file(path)
    password = password_provider(options)
    try:
        return keys.load_private_key(path, password or "", password_env=options.password_env)
    except SigningKeyError as exc:
        if password is None and "wrong password" in exc.message:
            raise SigningKeyError(
                f"private key {path} is locked with a password, and ${options.password_env} "
                "is not set",
                fix=keys.password_fix(options.password_env),
            ) from None
        raise


def _builtin_only(options: SignOptions) -> None:
    simple.require_no_tlog(options.tlog_upload)
    if options.method != "key":
        raise SigningConfigError(
            f"the built-in signer cannot sign with method {options.method!r}",
            fix="use `sign.method: key`, or install cosign and set `sign.signer: cosign` "
            f"({options.method} signing needs cosign and network access)",
        )


def _cosign_key(options: SignOptions, key_dir: Path) -> tuple[SigningKey, Path | None]:
    if options.method == "kms":
        if not options.kms_uri:
            raise SigningConfigError(
                "sign.method is kms but sign.kms_uri is empty",
                fix="set `sign.kms_uri` (e.g. awskms:///alias/gantry)",
            )
        return SigningKey("kms", options.kms_uri), None
    if options.method == "keyless":
        return SigningKey("keyless"), None
    priv, _ = key_paths(options, key_dir)
    _require_key_file(priv)
    return SigningKey("key", str(priv)), priv


def _cosign_key_id(
    runner: Cosign, key: SigningKey, priv: Path | None, password: str | None
) -> str | None:
    """Fingerprint of the signing key: from its .pub file, else `cosign public-key`."""
    if key.method == "keyless" or key.ref is None:
        return None
    pub = priv.with_suffix(".pub") if priv else None
    if pub is not None and pub.is_file():
        return keys.fingerprint_pem(pub.read_bytes(), source=str(pub))
    try:
        return keys.fingerprint_pem(runner.public_key(key.ref, password=password))
    except (CosignError, SigningKeyError) as exc:
        log.warning("could not read the public key of %s: %s", key.ref, exc)
        return None


def predicate_dict(predicate: bytes | Mapping[str, Any]) -> dict[str, Any]:
    """An attestation's predicate as the JSON object its statement holds."""
    if isinstance(predicate, bytes | bytearray):
        try:
            doc = json.loads(predicate)
        except ValueError as exc:
            raise SigningConfigError(f"the predicate is not JSON: {exc}") from None
    else:
        doc = dict(predicate)
    if not isinstance(doc, dict):
        raise SigningConfigError("the predicate must be a JSON object")
    return doc


# --- the facade --------------------------------------------------------------------------


def sign_image(
    image: str,
    options: SignOptions,
    key_dir: Path,
    *,
    annotations: Mapping[str, str] | None = None,
    password_provider: PasswordProvider = env_password,
    cosign: Cosign | None = None,
) -> ImageSignature:
    """Sign ``image`` (a tag is resolved to its digest first) and attach the signature."""
    ref = simple.parse_image_ref(image)
    signer = choose_signer(options)
    with _registry(ref) as registry:
        digest = simple.resolve_digest(registry, ref)
        pinned = f"{ref.name}@{digest}"
        tag = simple.signature_tag(digest)
        if signer == "builtin":
            _builtin_only(options)
            priv, pub = key_paths(options, key_dir)
            key = _load_builtin_key(priv, options, password_provider)
            done = simple.sign_image(registry, ref.at(digest), key, annotations=annotations)
            return ImageSignature(
                image=pinned,
                digest=digest,
                signature_tag=tag,
                signature_ref=f"{ref.name}:{tag}",
                signer="builtin",
                key_id=keys.key_id(key),
                public_key_path=str(pub) if pub.is_file() else None,
                tlog=False,
                signature_manifest_digest=done.manifest_digest,
                newly_signed=done.added,
            )
        runner = _cosign(registry, cosign)
    signing_key, key_file = _cosign_key(options, key_dir)
    password = password_provider(options) if options.method == "key" else None
    log.info("signing %s with cosign %s (%s)", pinned, runner.version, options.method)
    runner.sign(
        pinned,
        key=signing_key,
        password=(password or "") if options.method == "key" else None,
        tlog_upload=options.tlog_upload,
        annotations=annotations,
    )
    pub_file = key_file.with_suffix(".pub") if key_file else None
    return ImageSignature(
        image=pinned,
        digest=digest,
        signature_tag=tag,
        signature_ref=f"{ref.name}:{tag}",
        signer="cosign",
        key_id=_cosign_key_id(runner, signing_key, key_file, password),
        public_key_path=str(pub_file) if pub_file and pub_file.is_file() else None,
        tlog=options.tlog_upload,
    )


def attest(
    image: str,
    predicate_type: str,
    predicate: bytes | Mapping[str, Any],
    options: SignOptions,
    key_dir: Path,
    *,
    replace: bool = False,
    password_provider: PasswordProvider = env_password,
    cosign: Cosign | None = None,
) -> AttestationRef:
    """Attach a signed in-toto statement (e.g. ``cyclonedx`` SBOM, Gantry scan summary).

    ``predicate_type`` is a URI or a cosign short name (``cyclonedx``, ``spdxjson``…).
    """
    ref = simple.parse_image_ref(image)
    doc = predicate_dict(predicate)
    uri = simple.predicate_type_uri(predicate_type)
    signer = choose_signer(options)
    with _registry(ref) as registry:
        digest = simple.resolve_digest(registry, ref)
        pinned = f"{ref.name}@{digest}"
        tag = simple.attestation_tag(digest)
        if signer == "builtin":
            _builtin_only(options)
            priv, _ = key_paths(options, key_dir)
            key = _load_builtin_key(priv, options, password_provider)
            done = simple.attach_attestation(
                registry, ref.at(digest), key, uri, doc, replace_existing=replace
            )
            return AttestationRef(
                image=pinned,
                digest=digest,
                predicate_type=uri,
                attestation_tag=tag,
                reference=f"{ref.name}:{tag}",
                signer="builtin",
                key_id=keys.key_id(key),
                tlog=False,
                envelope_digest=done.layer_digest,
            )
        runner = _cosign(registry, cosign)
    signing_key, key_file = _cosign_key(options, key_dir)
    password = password_provider(options) if options.method == "key" else None
    runner.attest(
        pinned,
        key=signing_key,
        password=(password or "") if options.method == "key" else None,
        tlog_upload=options.tlog_upload,
        predicate=json.dumps(doc).encode(),
        predicate_type=predicate_type,
        replace=replace,
    )
    return AttestationRef(
        image=pinned,
        digest=digest,
        predicate_type=uri,
        attestation_tag=tag,
        reference=f"{ref.name}:{tag}",
        signer="cosign",
        key_id=_cosign_key_id(runner, signing_key, key_file, password),
        tlog=options.tlog_upload,
    )


def _verifying_key(
    options: SignOptions, public_key_path: Path | None
) -> tuple[SigningKey, dict[str, str], str | None]:
    """What cosign verifies with, as the image was signed: the public key file, the KMS
    key, or (keyless) the identity the certificate must name; and the key id, if any."""
    if options.method == "kms":
        assert options.kms_uri  # the options' validation requires it
        return SigningKey("kms", options.kms_uri), {}, None
    if options.method == "keyless":
        identity = {
            "certificate_identity": options.certificate_identity or "",
            "certificate_oidc_issuer": options.certificate_oidc_issuer or "",
        }
        return SigningKey("keyless"), identity, None
    if public_key_path is None:
        raise SigningKeyError(
            "verifying a key signature needs its public key", fix=keys.GENERATE_HINT
        )
    kid = keys.fingerprint_pem(_read_public(public_key_path), source=str(public_key_path))
    return SigningKey("key", str(public_key_path)), {}, kid


def verify_image(
    image: str,
    public_key_path: Path | None,
    *,
    options: SignOptions | None = None,
    check_identity: bool = True,
    cosign: Cosign | None = None,
) -> VerifiedSignature:
    """Verify ``image``'s signatures as ``options`` say it was signed (the public key at
    ``public_key_path``; a KMS key; a keyless identity); SignatureVerificationError if none
    is valid. A tag is resolved first: the digest it points at now is what must be signed.
    """
    options = options or SignOptions()
    ref = simple.parse_image_ref(image)
    verifier = choose_signer(options)
    key, identity, kid = _verifying_key(options, public_key_path)
    with _registry(ref) as registry:
        digest = simple.resolve_digest(registry, ref)
        if verifier == "builtin":
            _builtin_only(options)
            assert public_key_path is not None
            public = keys.load_public_key(public_key_path)
            found = simple.verify_signatures(
                registry, ref.at(digest), public, check_identity=check_identity
            )
            payloads = tuple(v.payload for v in found)
        else:
            runner = _cosign(registry, cosign)
            payloads = tuple(
                runner.verify(f"{ref.name}@{digest}", key=key, tlog=options.tlog_upload, **identity)
            )
    return VerifiedSignature(
        image=f"{ref.name}@{digest}",
        digest=digest,
        signature_ref=f"{ref.name}:{simple.signature_tag(digest)}",
        signer=verifier,
        key_id=kid,
        payloads=payloads,
    )


def verify_attestation(
    image: str,
    public_key_path: Path | None,
    predicate_type: str,
    *,
    options: SignOptions | None = None,
    cosign: Cosign | None = None,
) -> VerifiedAttestation:
    """Verify ``image``'s attestations of ``predicate_type`` as :func:`verify_image` does."""
    options = options or SignOptions()
    ref = simple.parse_image_ref(image)
    verifier = choose_signer(options)
    uri = simple.predicate_type_uri(predicate_type)
    key, identity, kid = _verifying_key(options, public_key_path)
    with _registry(ref) as registry:
        digest = simple.resolve_digest(registry, ref)
        if verifier == "builtin":
            _builtin_only(options)
            assert public_key_path is not None
            public = keys.load_public_key(public_key_path)
            found = simple.verify_attestations(registry, ref.at(digest), public, uri)
            statements = tuple(v.statement for v in found)
        else:
            runner = _cosign(registry, cosign)
            statements = tuple(
                runner.verify_attestation(
                    f"{ref.name}@{digest}",
                    key=key,
                    predicate_type=predicate_type,
                    tlog=options.tlog_upload,
                    **identity,
                )
            )
    return VerifiedAttestation(
        image=f"{ref.name}@{digest}",
        digest=digest,
        reference=f"{ref.name}:{simple.attestation_tag(digest)}",
        signer=verifier,
        key_id=kid,
        predicate_type=uri,
        statements=statements,
    )


def _read_public(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"public key {path} does not exist", fix=keys.GENERATE_HINT) from None
