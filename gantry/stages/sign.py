"""Stage `sign`: the image by digest (cosign or the built-in cosign-compatible signer),
attestations of its SBOM and scan result, and the weights with OpenSSF model-signing.

The stage's contract (:class:`SignResult`) and :func:`run` live here; the Prefect task and
its summary artifact are :mod:`tasks.sign`.

The image signature covers the image only; the weights are mounted, not baked in, so
they get a signature of their own, stored beside their manifest. Re-running a release
re-uses signatures that already verify with the same keys instead of piling up new ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.model_signing import WeightsSignature, sign_weights
from gantry.errors import SignatureVerificationError
from gantry.keyring import KeyPaths, password, resolve_keys
from gantry.manifest import WeightsManifest
from gantry.settings import Settings
from gantry.signing import image as image_signing
from gantry.signing.image import VerifiedSignature
from gantry.spec import ReleaseSpec, SignOptions
from gantry.stages.build import BuildResult
from gantry.stages.scan import ScanResult
from gantry.stages.weights import WeightsResult

log = logging.getLogger("gantry.sign")

SBOM_PREDICATE = "https://cyclonedx.org/bom"
SCAN_PREDICATE = "https://gantry.dev/attestations/scan-result/v1"


class SignResult(BaseModel):
    """Where the signatures are and which keys verify them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str
    signer: str = Field(description="cosign or builtin")
    signature_ref: str = Field(description="Where the image signature is stored.")
    public_key: str = Field(description="Public key that verifies the image signature.")
    attestations: dict[str, str] = Field(description="predicate type -> where it is stored")
    weights_signature: str = Field(description="Path of the weights' Sigstore bundle.")
    weights_public_key: str
    weights_key_fingerprint: str
    keys_generated: bool = Field(description="The embedded default keys were made by this run.")
    cached: bool = Field(description="Every signature already existed and verified.")
    sign_seconds: float
    # How the image was signed, so that every later verification uses the same (the
    # defaults are those of records written before these were kept).
    method: Literal["key", "kms", "keyless"] = "key"
    kms_uri: str | None = None
    tlog: bool = False
    certificate_identity: str | None = None
    certificate_oidc_issuer: str | None = None

    def verification(self) -> SignOptions:
        """The options that verify this image signature: those it was made with."""
        return SignOptions(
            method=self.method,
            kms_uri=self.kms_uri,
            tlog_upload=self.tlog,
            # A key signature without Rekor is checked by whichever implementation is
            # here (the formats are the same); KMS, keyless and Rekor need cosign.
            signer="auto" if self.method == "key" and not self.tlog else "cosign",
            certificate_identity=self.certificate_identity,
            certificate_oidc_issuer=self.certificate_oidc_issuer,
        )


def weights_signature_path(weights: WeightsResult) -> Path:
    """`<snapshot>.sig.json`, beside `<snapshot>.manifest.json` (never inside the tree)."""
    snap = Path(weights.path)
    return snap.with_name(snap.name + ".sig.json")


def _public_key(opts: SignOptions, keys: KeyPaths) -> Path | None:
    return Path(keys.image_pub) if opts.method == "key" else None


def _existing_signature(image: str, keys: KeyPaths, opts: SignOptions) -> VerifiedSignature | None:
    try:
        return image_signing.verify_image(image, _public_key(opts, keys), options=opts)
    except SignatureVerificationError:
        return None


def _already_attested(
    image: str, keys: KeyPaths, opts: SignOptions, predicate: str, body: bytes
) -> bool:
    """Whether an attestation of ``predicate`` with exactly ``body`` already verifies: a
    scan result that changed since (a re-scan) is attested again."""
    try:
        found = image_signing.verify_attestation(
            image, _public_key(opts, keys), predicate, options=opts
        )
    except SignatureVerificationError:
        return False
    want = image_signing.predicate_dict(body)
    return any(st.get("predicate") == want for st in found.statements)


def run(
    spec: ReleaseSpec,
    build: BuildResult,
    scan: ScanResult,
    weights: WeightsResult,
    settings: Settings,
) -> SignResult:
    """Sign image and weights; attest SBOM and scan result. Idempotent."""
    t0 = time.monotonic()
    keys = resolve_keys(spec.sign, settings)
    opts = spec.sign
    reused = True

    if (existing := _existing_signature(build.image, keys, opts)) is not None:
        log.info("image %s is already signed with %s", build.image, keys.image_pub)
        signer, signature_ref = existing.signer, existing.signature_ref
    else:
        reused = False
        sig = image_signing.sign_image(build.image, opts, Path(keys.image_key))
        log.info("signed %s (%s signer)", build.image, sig.signer)
        signer, signature_ref = sig.signer, sig.signature_ref

    attestations: dict[str, str] = {}
    for predicate, body in (
        (SBOM_PREDICATE, Path(scan.sbom_path).read_bytes()),
        (SCAN_PREDICATE, scan.model_dump_json().encode()),
    ):
        if _already_attested(build.image, keys, opts, predicate, body):
            attestations[predicate] = "existing"
            continue
        reused = False
        ref = image_signing.attest(build.image, predicate, body, opts, Path(keys.image_key))
        attestations[predicate] = ref.reference

    manifest = WeightsManifest.model_validate_json(Path(weights.manifest_path).read_bytes())
    wsig: WeightsSignature = sign_weights(
        Path(weights.path),
        private_key=Path(keys.weights_key),
        password=password(opts) or None,
        signature_path=weights_signature_path(weights),
        manifest=manifest,
        password_env=opts.password_env,
    )
    reused = reused and wsig.reused
    return SignResult(
        image=build.image,
        signer=signer,
        signature_ref=signature_ref,
        public_key=keys.image_pub,
        attestations=attestations,
        weights_signature=str(wsig.path),
        weights_public_key=keys.weights_pub,
        weights_key_fingerprint=wsig.public_key_fingerprint,
        keys_generated=keys.generated,
        cached=reused,
        sign_seconds=round(time.monotonic() - t0, 3),
        method=opts.method,
        kms_uri=opts.kms_uri,
        tlog=opts.tlog_upload,
        certificate_identity=opts.certificate_identity,
        certificate_oidc_issuer=opts.certificate_oidc_issuer,
    )
