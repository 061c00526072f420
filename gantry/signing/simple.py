"""Gantry's built-in signer: cosign's image signature and attestation format, in Python.

Used when the ``cosign`` binary is not installed (``sign.signer: builtin``, or ``auto``
without cosign). It signs with a cosign key file (see :mod:`gantry.signing.keys`), needs
no network beyond the registry, and has no transparency log.

What it writes, for an image ``REG/REPO@sha256:HEX``, in the same repository:

* **Signatures**, under the tag ``sha256-HEX.sig``: an OCI image manifest
  (``application/vnd.oci.image.manifest.v1+json``) whose config is a small image config
  blob (``application/vnd.oci.image.config.v1+json``: empty architecture/os, zero created
  time, one ``rootfs.diff_ids`` entry and one empty history entry per layer, as
  go-containerregistry's ``empty.Image`` + ``mutate.Append`` produce) and which has one
  layer per signature. A layer is the simple-signing payload
  ``{"critical":{"identity":{"docker-reference":"REG/REPO"},"image":
  {"docker-manifest-digest":"sha256:HEX"},"type":"cosign container image signature"},
  "optional":null}`` (``optional`` holds the annotations when there are any), stored as a
  blob of media type ``application/vnd.dev.cosign.simplesigning.v1+json``; the layer
  descriptor's annotation ``dev.cosignproject.cosign/signature`` is the base64 ASN.1 DER
  ECDSA P-256 signature over SHA-256 of the payload bytes. Signing appends a layer to an
  existing manifest; signing the same digest again with the same key adds nothing (cosign's
  duplicate check: same payload digest and media type, existing signature verifies).
* **Attestations**, under ``sha256-HEX.att``: the same manifest shape, one layer per
  attestation, media type ``application/vnd.dsse.envelope.v1+json``: a DSSE envelope
  ``{"payloadType":"application/vnd.in-toto+json","payload":B64,"signatures":
  [{"keyid":"","sig":B64}]}`` whose signature is over DSSE's PAE encoding, and whose payload
  is an in-toto Statement v0.1 (``_type`` ``https://in-toto.io/Statement/v0.1``, subject
  ``[{"name":"REG/REPO","digest":{"sha256":"HEX"}}]``, ``predicateType``, ``predicate``).
  Layer annotations: ``predicateType`` and an empty ``dev.cosignproject.cosign/signature``,
  as cosign writes them. Re-attaching an identical statement signed by the same key adds
  nothing (a Gantry choice: cosign appends); ``replace=True`` drops earlier attestations of
  the same predicate type first (cosign's ``--replace``).

Verification fetches the tag, and for each layer checks the payload blob against its
digest, the signature against the public key, the claimed digest against the image's
(``docker-manifest-digest``, or an in-toto subject), and the claimed repository
(``docker-reference``) against the image's. It reports exactly which check failed.

What this was checked against: cosign's published ``specs/SIGNATURE_SPEC.md`` and
``specs/ATTESTATION_SPEC.md``, and its source (``pkg/oci/static``, ``pkg/oci/mutate``,
``pkg/oci/empty``, ``pkg/types``, ``pkg/cosign/attestation``, ``pkg/cosign/verifiers.go``,
``pkg/cosign/remote`` for the duplicate check) with go-containerregistry's config and
manifest structs and sigstore's ``payload`` and ``dsse`` packages. For the layer of the
``.sig`` manifest shown in cosign's README, the config blob written here has that manifest's
config digest (sha256:3b25a088…), i.e. it is byte for byte cosign's; a DSSE envelope
produced by cosign's own tests verifies here
(``tests/data/cosign``). **Compatibility with the real cosign binary is not proven**: cosign
is not installable where this was written, so no signature made here has been verified by
``cosign verify`` nor the reverse. ``tests/integration/test_image_signing.py`` has that
cross-check; it runs wherever ``cosign`` is on PATH. Known differences: no Rekor bundle or
certificate annotations (no transparency log, no keyless); only ECDSA P-256 keys; the
signatures always live in the image's own repository (no ``COSIGN_REPOSITORY``); and, as with
cosign, two signers appending to the same tag at the same moment can lose one signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gantry.adapters.registry import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_MANIFEST,
    Manifest,
    RegistryClient,
    sha256_digest,
)
from gantry.errors import (
    ImageReferenceError,
    RegistryError,
    SignatureVerificationError,
    SigningConfigError,
)
from gantry.signing.keys import key_id

log = logging.getLogger(__name__)

SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_V01 = "https://in-toto.io/Statement/v0.1"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PREDICATE_TYPE_ANNOTATION = "predicateType"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"

CYCLONEDX_PREDICATE = "https://cyclonedx.org/bom"
#: Gantry's scan summary (the vulnerability gate's verdict and counts) as a predicate.
GANTRY_SCAN_PREDICATE = "https://gantry.ai/attestations/scan-summary/v1"

#: cosign's ``--type`` short names (cmd/cosign/cli/options/predicate.go) that Gantry uses.
PREDICATE_TYPES = {
    "cyclonedx": CYCLONEDX_PREDICATE,
    "spdx": "https://spdx.dev/Document",
    "spdxjson": "https://spdx.dev/Document",
    "slsaprovenance": "https://slsa.dev/provenance/v0.2",
    "slsaprovenance02": "https://slsa.dev/provenance/v0.2",
    "slsaprovenance1": "https://slsa.dev/provenance/v1",
    "custom": "https://cosign.sigstore.dev/attestation/v1",
    "vuln": "https://cosign.sigstore.dev/attestation/vuln/v1",
    "openvex": "https://openvex.dev/ns",
}

DOCKER_HUB = "index.docker.io"  # go-containerregistry's name for Docker Hub
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time, as cosign's configs carry it


def predicate_type_uri(name_or_uri: str) -> str:
    """A cosign ``--type`` short name (``cyclonedx``…) as its URI; a URI unchanged."""
    return PREDICATE_TYPES.get(name_or_uri, name_or_uri)


# --- image references --------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """``registry/repository[:tag][@digest]``, normalised the way cosign names images."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``: what cosign writes as ``docker-reference``."""
        return f"{self.registry}/{self.repository}"

    def at(self, digest: str) -> ImageRef:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_image_ref(image: str) -> ImageRef:
    """Parse ``image``; a bare name means Docker Hub, like the docker CLI and cosign."""

    def bad(why: str) -> ImageReferenceError:
        return ImageReferenceError(
            f"{image!r} is not an image reference: {why}",
            fix="use REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:<64 hex>",
        )

    rest, at, digest = image.strip().partition("@")
    if at and not _DIGEST.match(digest):
        raise bad("the digest must be sha256:<64 lowercase hex>")
    tag: str | None = None
    slash = rest.rfind("/")
    if ":" in rest[slash + 1 :]:
        rest, _, tag = rest.rpartition(":")
        if not _TAG.match(tag):
            raise bad(f"invalid tag {tag!r}")
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry = first
    else:
        registry, path = DOCKER_HUB, rest
        if "/" not in path:
            path = f"library/{path}"
    if not path or not _REPO_PATH.match(path):
        raise bad(f"invalid repository {path!r} (lowercase letters, digits, `._-`, `/`)")
    return ImageRef(registry=registry, repository=path, tag=tag, digest=digest or None)


def signature_tag(digest: str) -> str:
    """Where cosign finds an image's signatures: ``sha256:HEX`` → ``sha256-HEX.sig``."""
    return digest.replace(":", "-") + ".sig"


def attestation_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".att"


def resolve_digest(registry: RegistryClient, ref: ImageRef) -> str:
    """The manifest digest ``ref`` names: its own, or what its tag points at now."""
    if ref.digest:
        return ref.digest
    tag = ref.tag or "latest"
    digest = registry.manifest_digest(ref.repository, tag)
    if digest is None:
        raise RegistryError(
            f"{ref.name}:{tag} does not exist in {registry.base}",
            fix="push the image first, or check its name and tag",
        )
    return digest


# --- payloads and signatures -------------------------------------------------------------


def go_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it (HTML characters escaped)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def simple_signing_payload(
    docker_reference: str, digest: str, annotations: Mapping[str, str] | None = None
) -> bytes:
    """The bytes cosign signs for an image (sigstore's ``payload.Cosign`` marshalled)."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        # Go marshals a nil map as null, and a map with its keys sorted.
        "optional": dict(sorted(annotations.items())) if annotations else None,
    }
    return go_json(doc)


def sign_bytes(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA over SHA-256 of ``data``, ASN.1 DER (what cosign's P-256 signer returns)."""
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_bytes(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature actually covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def in_toto_statement(
    subject_name: str, digest: str, predicate_type: str, predicate: Mapping[str, Any]
) -> bytes:
    """An in-toto Statement v0.1 about one image (keys sorted, so it is reproducible)."""
    algo, _, hexdigest = digest.partition(":")
    doc = {
        "_type": IN_TOTO_STATEMENT_V01,
        "predicateType": predicate_type,
        "subject": [{"name": subject_name, "digest": {algo: hexdigest}}],
        "predicate": dict(predicate),
    }
    return go_json(doc, sort_keys=True)


def dsse_envelope(key: ec.EllipticCurvePrivateKey, payload_type: str, payload: bytes) -> bytes:
    signature = sign_bytes(key, pae(payload_type, payload))
    return go_json(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": "", "sig": base64.b64encode(signature).decode()}],
        }
    )


# --- the signature / attestation manifests -----------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One entry of a ``.sig``/``.att`` manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "size": self.size, "digest": self.digest}
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        return d


@dataclass(frozen=True)
class _Stored:
    manifest: Manifest | None
    media_type: str
    config: dict[str, Any] | None
    layers: list[Layer]


def _load(registry: RegistryClient, repository: str, tag: str) -> _Stored:
    manifest = registry.get_manifest(repository, tag, accept=f"{OCI_MANIFEST}, {DOCKER_MANIFEST}")
    if manifest is None:
        return _Stored(None, OCI_MANIFEST, None, [])
    doc = manifest.json()
    layers = [
        Layer(
            media_type=str(d.get("mediaType", "")),
            digest=str(d["digest"]),
            size=int(d.get("size", 0)),
            annotations={str(k): str(v) for k, v in (d.get("annotations") or {}).items()},
        )
        for d in doc.get("layers") or []
    ]
    config: dict[str, Any] | None = None
    config_digest = (doc.get("config") or {}).get("digest")
    if config_digest:
        try:
            loaded = json.loads(registry.get_blob(repository, config_digest))
            config = loaded if isinstance(loaded, dict) else None
        except (RegistryError, ValueError):
            config = None  # rebuilt from the layers below
    media_type = str(doc.get("mediaType") or manifest.media_type or OCI_MANIFEST)
    return _Stored(manifest, media_type, config, layers)


def config_blob(layers: Iterable[Layer], base: dict[str, Any] | None = None) -> bytes:
    """The image config cosign's ``.sig``/``.att`` images carry.

    ``base`` is the config already stored, extended by the layers it does not list yet
    (``mutate.Append`` extends the base image's config the same way).
    """
    layers = list(layers)
    if base is not None and isinstance(base.get("rootfs"), dict):
        cfg = json.loads(json.dumps(base))
        diff_ids: list[str] = list(cfg["rootfs"].get("diff_ids") or [])
        history: list[Any] = list(cfg.get("history") or [])
        for layer in layers[len(diff_ids) :]:
            diff_ids.append(layer.digest)  # uncompressed payload: diff_id == digest
            history.append({"created": _ZERO_TIME})
        cfg["rootfs"]["diff_ids"] = diff_ids
        cfg["history"] = history
        return go_json(cfg)
    # go-containerregistry's ConfigFile field order; `config` is an all-omitempty struct.
    return go_json(
        {
            "architecture": "",
            "created": _ZERO_TIME,
            "history": [{"created": _ZERO_TIME} for _ in layers],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            "config": {},
        }
    )


def _store(
    registry: RegistryClient,
    repository: str,
    tag: str,
    stored: _Stored,
    layers: list[Layer],
    new_blobs: Mapping[str, bytes],
) -> str:
    for data in new_blobs.values():
        registry.push_blob(repository, data)
    # Extend the stored config only while it describes a prefix of the new layer list
    # (appending); after a replace, or for a config that does not match, build it afresh.
    old_ids = [ly.digest for ly in stored.layers]
    keep = (
        stored.config is not None
        and [ly.digest for ly in layers[: len(old_ids)]] == old_ids
        and (stored.config.get("rootfs") or {}).get("diff_ids") == old_ids
    )
    cfg = config_blob(layers, stored.config if keep else None)
    cfg_digest = registry.push_blob(repository, cfg)
    config_media_type = OCI_CONFIG
    if stored.media_type == DOCKER_MANIFEST:
        config_media_type = "application/vnd.docker.container.image.v1+json"
    manifest = go_json(
        {
            "schemaVersion": 2,
            "mediaType": stored.media_type,
            "config": {"mediaType": config_media_type, "size": len(cfg), "digest": cfg_digest},
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return registry.put_manifest(repository, tag, manifest, stored.media_type)


@dataclass(frozen=True)
class Attached:
    """A signature or attestation in the registry."""

    ref: ImageRef  #: the image, by digest
    tag: str  #: ``sha256-HEX.sig`` or ``.att``
    manifest_digest: str  #: digest of the manifest under ``tag`` now
    layer_digest: str  #: the payload (or envelope) blob
    added: bool  #: False when an identical signed layer was already there


def _require_image(registry: RegistryClient, ref: ImageRef) -> str:
    digest = resolve_digest(registry, ref)
    if ref.digest and registry.manifest_digest(ref.repository, digest) is None:
        raise RegistryError(
            f"cannot sign {ref.name}@{digest}: the registry {registry.base} has no such manifest",
            fix="push the image first, or check the digest",
        )
    return digest


def sign_image(
    registry: RegistryClient,
    ref: ImageRef,
    key: ec.EllipticCurvePrivateKey,
    *,
    annotations: Mapping[str, str] | None = None,
) -> Attached:
    """Sign ``ref`` (resolved to its digest) and attach the signature under its ``.sig`` tag."""
    digest = _require_image(registry, ref)
    tag = signature_tag(digest)
    payload = simple_signing_payload(ref.name, digest, annotations)
    payload_digest = sha256_digest(payload)
    stored = _load(registry, ref.repository, tag)
    public = key.public_key()
    for layer in stored.layers:
        # cosign's duplicate check (pkg/cosign/remote): same payload and media type, and the
        # existing signature verifies with this key.
        if layer.digest != payload_digest or layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE:
            continue
        try:
            existing = base64.b64decode(
                layer.annotations.get(SIGNATURE_ANNOTATION, ""), validate=True
            )
        except binascii.Error:
            continue
        if existing and verify_bytes(public, payload, existing):
            assert stored.manifest is not None
            log.info("%s@%s is already signed by key %s", ref.name, digest, key_id(key)[:12])
            return Attached(ref.at(digest), tag, stored.manifest.digest, payload_digest, False)
    signature = base64.b64encode(sign_bytes(key, payload)).decode()
    layer = Layer(
        SIMPLE_SIGNING_MEDIA_TYPE, payload_digest, len(payload), {SIGNATURE_ANNOTATION: signature}
    )
    manifest_digest = _store(
        registry, ref.repository, tag, stored, [*stored.layers, layer], {payload_digest: payload}
    )
    log.info("signed %s@%s; signature under %s:%s", ref.name, digest, ref.name, tag)
    return Attached(ref.at(digest), tag, manifest_digest, payload_digest, True)


def attach_attestation(
    registry: RegistryClient,
    ref: ImageRef,
    key: ec.EllipticCurvePrivateKey,
    predicate_type: str,
    predicate: Mapping[str, Any],
    *,
    replace_existing: bool = False,
) -> Attached:
    """Sign an in-toto statement about ``ref`` and attach it under its ``.att`` tag."""
    predicate_type = predicate_type_uri(predicate_type)
    digest = _require_image(registry, ref)
    tag = attestation_tag(digest)
    statement = in_toto_statement(ref.name, digest, predicate_type, predicate)
    stored = _load(registry, ref.repository, tag)
    layers = list(stored.layers)
    if replace_existing:
        layers = [
            ly for ly in layers if ly.annotations.get(PREDICATE_TYPE_ANNOTATION) != predicate_type
        ]
    else:
        public = key.public_key()
        for layer in layers:
            if layer.media_type != DSSE_MEDIA_TYPE:
                continue
            if layer.annotations.get(PREDICATE_TYPE_ANNOTATION) != predicate_type:
                continue
            try:
                opened = _open_envelope(registry.get_blob(ref.repository, layer.digest), public)
            except RegistryError:
                continue  # a broken earlier layer is no duplicate of this one
            if isinstance(opened, bytes) and opened == statement:
                assert stored.manifest is not None
                log.info("%s@%s already has this %s attestation", ref.name, digest, predicate_type)
                return Attached(ref.at(digest), tag, stored.manifest.digest, layer.digest, False)
    envelope = dsse_envelope(key, IN_TOTO_PAYLOAD_TYPE, statement)
    env_digest = sha256_digest(envelope)
    layer = Layer(
        DSSE_MEDIA_TYPE,
        env_digest,
        len(envelope),
        # cosign's static.NewAttestation: an empty signature annotation (the signature is
        # inside the envelope) and the predicate type.
        {SIGNATURE_ANNOTATION: "", PREDICATE_TYPE_ANNOTATION: predicate_type},
    )
    manifest_digest = _store(
        registry, ref.repository, tag, stored, [*layers, layer], {env_digest: envelope}
    )
    log.info("attested %s@%s (%s) under %s", ref.name, digest, predicate_type, tag)
    return Attached(ref.at(digest), tag, manifest_digest, env_digest, True)


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedPayload:
    """A signature that verified: the signed simple-signing payload."""

    payload: dict[str, Any]
    raw: bytes
    layer_digest: str


@dataclass(frozen=True)
class VerifiedStatement:
    """An attestation that verified: its in-toto statement."""

    statement: dict[str, Any]
    predicate_type: str
    layer_digest: str


def _open_envelope(raw: bytes, key: ec.EllipticCurvePublicKey) -> bytes | str:
    """The statement bytes of a DSSE envelope signed by ``key``, or why not (a str)."""
    try:
        env = json.loads(raw)
        payload_type = env["payloadType"]
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env.get("signatures") or []]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return "is not a well-formed DSSE envelope (corrupted)"
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        return f"has payload type {payload_type!r}, not {IN_TOTO_PAYLOAD_TYPE!r}"
    if not sigs:
        return "carries no signature"
    signed = pae(payload_type, payload)
    if not any(verify_bytes(key, signed, s) for s in sigs):
        return "does not verify with this key (signed by another key, or altered)"
    return payload


def verify_signatures(
    registry: RegistryClient,
    ref: ImageRef,
    key: ec.EllipticCurvePublicKey,
    *,
    check_identity: bool = True,
) -> list[VerifiedPayload]:
    """The payloads of ``ref``'s signatures that verify with ``key``.

    SignatureVerificationError when there is none, saying why for each signature found.
    ``check_identity`` also requires the claimed repository to be ``ref``'s (cosign itself
    checks only the digest; off, signatures copied between repositories verify).
    """
    digest = resolve_digest(registry, ref)
    shown = _shown(ref, digest)
    tag = signature_tag(digest)
    kid = key_id(key)[:12]
    stored = _load(registry, ref.repository, tag)
    if stored.manifest is None:
        raise SignatureVerificationError(
            shown,
            f"no signature for {ref.name}@{digest}: {ref.name} has no tag {tag}",
            fix="sign this digest (the `sign` stage); if a tag was moved since signing, "
            "verify the digest that was signed",
        )
    problems: list[str] = []
    verified: list[VerifiedPayload] = []
    for layer in stored.layers:
        what = f"signature layer {layer.digest[7:19]}"
        if layer.media_type != SIMPLE_SIGNING_MEDIA_TYPE:
            problems.append(f"{what} has media type {layer.media_type!r}, not simple signing")
            continue
        try:
            signature = base64.b64decode(
                layer.annotations.get(SIGNATURE_ANNOTATION, ""), validate=True
            )
        except binascii.Error:
            problems.append(f"{what}: the signature annotation is not base64 (corrupted)")
            continue
        if not signature:
            problems.append(f"{what} has no signature annotation")
            continue
        try:
            raw = registry.get_blob(ref.repository, layer.digest)
        except RegistryError as exc:
            problems.append(f"{what}: its payload cannot be read ({exc.message})")
            continue
        if not verify_bytes(key, raw, signature):
            problems.append(
                f"{what} does not verify with key {kid} (signed by another key, or altered)"
            )
            continue
        try:
            doc = json.loads(raw)
            critical = doc["critical"]
            claimed = critical["image"]["docker-manifest-digest"]
            reference = critical["identity"]["docker-reference"]
            kind = critical["type"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{what}: the signed payload is not a simple-signing document")
            continue
        if kind != COSIGN_SIGNATURE_TYPE:
            problems.append(f"{what}: payload type {kind!r} is not {COSIGN_SIGNATURE_TYPE!r}")
            continue
        if claimed != digest:
            problems.append(f"{what} is for another digest: {claimed}, not {digest}")
            continue
        if check_identity and _repo_of(str(reference)) != ref.name:
            problems.append(f"{what} names repository {reference!r}, not {ref.name!r}")
            continue
        verified.append(VerifiedPayload(payload=doc, raw=raw, layer_digest=layer.digest))
    if not verified:
        raise SignatureVerificationError(
            shown,
            f"none of the {len(stored.layers)} signature(s) under {ref.name}:{tag} is valid: "
            + "; ".join(problems),
            fix=f"verify with the public key of the key that signed it (this one is {kid}…), "
            "or sign the image again",
        )
    return verified


def verify_attestations(
    registry: RegistryClient,
    ref: ImageRef,
    key: ec.EllipticCurvePublicKey,
    predicate_type: str | None,
) -> list[VerifiedStatement]:
    """The statements of ``ref``'s attestations (of ``predicate_type``) that verify."""
    wanted = predicate_type_uri(predicate_type) if predicate_type else None
    digest = resolve_digest(registry, ref)
    shown = _shown(ref, digest)
    tag = attestation_tag(digest)
    kid = key_id(key)[:12]
    stored = _load(registry, ref.repository, tag)
    if stored.manifest is None:
        raise SignatureVerificationError(
            shown,
            f"no attestation for {ref.name}@{digest}: {ref.name} has no tag {tag}",
            fix="attest this digest (the `sign` stage); if a tag was moved since, verify the "
            "digest that was attested",
        )
    problems: list[str] = []
    other_types: list[str] = []
    verified: list[VerifiedStatement] = []
    for layer in stored.layers:
        what = f"attestation layer {layer.digest[7:19]}"
        if layer.media_type != DSSE_MEDIA_TYPE:
            problems.append(f"{what} has media type {layer.media_type!r}, not a DSSE envelope")
            continue
        try:
            opened = _open_envelope(registry.get_blob(ref.repository, layer.digest), key)
        except RegistryError as exc:
            problems.append(f"{what}: its envelope cannot be read ({exc.message})")
            continue
        if isinstance(opened, str):
            problems.append(f"{what} {opened.replace('this key', f'key {kid}')}")
            continue
        try:
            statement = json.loads(opened)
            stmt_type = str(statement["predicateType"])
            subjects = statement["subject"]
            subject_digests = [
                f"sha256:{s['digest']['sha256']}"
                for s in subjects
                if s and "sha256" in s.get("digest", {})
            ]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{what}: the signed payload is not an in-toto statement")
            continue
        if digest not in subject_digests:
            problems.append(
                f"{what} is for another digest: {', '.join(subject_digests) or 'none'}, "
                f"not {digest}"
            )
            continue
        if wanted and stmt_type != wanted:
            other_types.append(stmt_type)
            continue
        verified.append(VerifiedStatement(statement, stmt_type, layer.digest))
    if not verified:
        if other_types:
            found = ", ".join(sorted(set(other_types)))
            problems.append(f"no attestation of type {wanted} (valid ones have: {found})")
        raise SignatureVerificationError(
            shown,
            f"none of the {len(stored.layers)} attestation(s) under {ref.name}:{tag} is valid"
            + (f" for {wanted}" if wanted else "")
            + ": "
            + "; ".join(problems),
            fix=f"verify with the public key of the key that attested it (this one is {kid}…), "
            "or attest the image again",
        )
    return verified


def _shown(ref: ImageRef, digest: str) -> str:
    """How an error names the image: with the tag the user gave, and what it resolved to."""
    if ref.tag:
        return f"{ref.name}:{ref.tag} (resolves to {digest})"
    return f"{ref.name}@{digest}"


def _repo_of(reference: str) -> str:
    """``docker-reference`` may carry a tag or digest (cosign's claimed identity)."""
    try:
        return parse_image_ref(reference).name
    except ImageReferenceError:
        return reference


def require_no_tlog(tlog_upload: bool) -> None:
    if tlog_upload:
        raise SigningConfigError(
            "the built-in signer has no transparency log, but sign.tlog_upload is true",
            fix="set `sign.tlog_upload: false`, or install cosign and use `sign.signer: cosign` "
            "on a machine that can reach Rekor",
        )
