"""Image signing: cosign's key format and registry layout, with cosign or a built-in signer.

:mod:`gantry.signing.image` is the entry point (``sign_image``, ``attest``,
``verify_image``, ``verify_attestation``, ``generate_keypair``);
:mod:`gantry.signing.keys` reads and writes cosign key files;
:mod:`gantry.signing.simple` is the built-in signer and verifier.
"""

from gantry.signing.image import (
    AttestationRef,
    ImageSignature,
    VerifiedAttestation,
    VerifiedSignature,
    attest,
    choose_signer,
    generate_keypair,
    sign_image,
    verify_attestation,
    verify_image,
)
from gantry.signing.simple import CYCLONEDX_PREDICATE, GANTRY_SCAN_PREDICATE

__all__ = [
    "CYCLONEDX_PREDICATE",
    "GANTRY_SCAN_PREDICATE",
    "AttestationRef",
    "ImageSignature",
    "VerifiedAttestation",
    "VerifiedSignature",
    "attest",
    "choose_signer",
    "generate_keypair",
    "sign_image",
    "verify_attestation",
    "verify_image",
]
