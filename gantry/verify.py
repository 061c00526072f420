"""Verification before use: the one function smoke, canary and re-evaluation call.

Given a release record (or an image digest and a weights snapshot), it checks that the
image signature verifies by digest, that every weights file still matches the manifest,
and that the weights signature verifies. Any failure raises; nothing is used unverified.

    >>> verify_release(Path(".gantry/releases/minilm-….json"))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gantry.errors import ConfigError, SignatureVerificationError
from gantry.manifest import WeightsManifest
from gantry.record import load_record
from gantry.spec import SignOptions


class Verified(BaseModel):
    """What was verified, and how long it took."""

    model_config = ConfigDict(frozen=True)

    image: str
    image_signer: str
    image_public_key: str
    weights_path: str
    manifest_digest: str
    weights_signature: str
    weights_files: int
    seconds: float


def verify_artifacts(
    *,
    image: str,
    image_public_key: Path | None,
    weights_path: Path,
    manifest_path: Path,
    weights_signature: Path,
    weights_public_key: Path,
    image_options: SignOptions | None = None,
) -> Verified:
    """Verify an image (by digest) and a weights snapshot against their signatures;
    ``image_options``: how the image was signed (method, KMS key, identity, tlog), which is
    how it is verified."""
    from gantry.adapters.model_signing import verify_weights
    from gantry.signing.image import verify_image
    from gantry.stages.weights import verify_snapshot

    t0 = time.monotonic()
    if "@sha256:" not in image:
        raise SignatureVerificationError(
            f"{image} is not a reference by digest",
            fix="verify and run images as <repo>@sha256:…, never by tag",
        )
    verified = verify_image(image, image_public_key, options=image_options)
    manifest = WeightsManifest.model_validate_json(manifest_path.read_bytes())
    verify_snapshot(weights_path, manifest)
    wv = verify_weights(
        weights_path,
        signature_path=weights_signature,
        public_key=weights_public_key,
        manifest=manifest,
    )
    return Verified(
        image=image,
        image_signer=verified.signer,
        image_public_key=str(image_public_key or ""),
        weights_path=str(weights_path),
        manifest_digest=manifest.digest,
        weights_signature=str(weights_signature),
        weights_files=wv.files,
        seconds=round(time.monotonic() - t0, 3),
    )


def verify_release(record_path: Path) -> Verified:
    """Verify what a release record points at (its build, weights and sign stages)."""
    record = load_record(record_path)
    results = {name: st.result for name, st in record.stages.items()}
    build, weights, sign = results.get("build"), results.get("weights"), results.get("sign")
    if not (build and weights and sign):
        missing = [n for n, r in (("build", build), ("weights", weights), ("sign", sign)) if not r]
        raise ConfigError(
            f"release {record.release_id} has no result for stage(s) {', '.join(missing)}; "
            "there is nothing signed to verify",
            fix="run the release to completion first (`gantry release SPEC`)",
        )
    from gantry.stages.sign import SignResult

    signed = SignResult.model_validate(sign)
    return verify_artifacts(
        image=str(build["image"]),
        image_public_key=Path(signed.public_key) if signed.method == "key" else None,
        weights_path=Path(weights["path"]),
        manifest_path=Path(weights["manifest_path"]),
        weights_signature=Path(signed.weights_signature),
        weights_public_key=Path(signed.weights_public_key),
        image_options=signed.verification(),
    )
