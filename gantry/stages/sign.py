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

from pydantic import BaseModel, ConfigDict, Field

from gantry.adapters.model_signing import WeightsSignature, sign_weights
from gantry.errors import SignatureVerificationError
from gantry.keyring import KeyPaths, password, resolve_keys
from gantry.manifest import WeightsManifest
from gantry.settings import Settings
from gantry.signing import image as image_signing
from gantry.signing.image import VerifiedSignature
from gantry.spec import ReleaseSpec
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


def weights_signature_path(weights: WeightsResult) -> Path:
    """`<snapshot>.sig.json`, beside `<snapshot>.manifest.json` (never inside the tree)."""
    snap = Path(weights.path)
    return snap.with_name(snap.name + ".sig.json")


def _existing_signature(image: str, keys: KeyPaths) -> VerifiedSignature | None:
    try:
        return image_signing.verify_image(image, Path(keys.image_pub))
    except SignatureVerificationError:
        return None


def _already_attested(image: str, keys: KeyPaths, predicate: str) -> bool:
    try:
        image_signing.verify_attestation(image, Path(keys.image_pub), predicate)
    except SignatureVerificationError:
        return False
    return True


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

    if (existing := _existing_signature(build.image, keys)) is not None:
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
        if _already_attested(build.image, keys, predicate):
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
    )
