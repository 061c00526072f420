"""HMAC-SHA256 signatures of webhook bodies, in GitHub's ``sha256=<hex>`` format."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from gantry.errors import WebhookSignatureError

#: Headers that may carry a signature: GitHub's, and the same format for other senders.
SIGNATURE_HEADERS = ("x-hub-signature-256", "x-gantry-signature")
_PREFIX = "sha256="
_HEX = re.compile(r"[0-9a-f]{64}")


def sign(body: bytes, secret: bytes) -> str:
    """The header value a sender puts on ``body``.

    >>> sign(b"{}", b"s3cret")[:7]
    'sha256='
    """
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, headers: Mapping[str, str], secret: bytes) -> list[str]:
    """Check every signature header present on the raw ``body``; return their names.

    ``headers`` is looked up by lower-case name (Starlette's ``Headers`` is
    case-insensitive). At least one header must be present, and each present one must
    match: a sender that adds both cannot smuggle a bad one beside a good one. Messages
    never contain the header's value.
    """
    if not secret:
        # An empty key would make every sender able to sign; refuse rather than accept.
        raise WebhookSignatureError("the receiver has no secret configured")
    present = [(name, headers[name]) for name in SIGNATURE_HEADERS if name in headers]
    if not present:
        raise WebhookSignatureError(
            "the delivery is not signed: no X-Hub-Signature-256 or X-Gantry-Signature header"
        )
    expected = sign(body, secret).encode()
    for name, value in present:
        given = value.strip()
        if not given.lower().startswith(_PREFIX):
            raise WebhookSignatureError(f"{name} must have the form sha256=<64 hex digits>")
        digest = given[len(_PREFIX) :].lower()
        if not _HEX.fullmatch(digest):
            raise WebhookSignatureError(f"{name} must have the form sha256=<64 hex digits>")
        if not hmac.compare_digest(expected, (_PREFIX + digest).encode()):
            raise WebhookSignatureError(f"{name} does not match the body and the shared secret")
    return [name for name, _ in present]
