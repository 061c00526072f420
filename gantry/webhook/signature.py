"""HMAC-SHA256 signatures of webhook bodies: GitHub's ``sha256=<hex>``, and for other
senders optionally with a timestamp, ``t=<unix time>,v1=<hex>`` over ``"<t>." + body`` (as
Stripe signs), so that a captured body cannot be replayed outside a tolerance window."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

from gantry.errors import WebhookSignatureError

#: Headers that may carry a signature: GitHub's, and the same format for other senders.
SIGNATURE_HEADERS = ("x-hub-signature-256", "x-gantry-signature")
_PREFIX = "sha256="
_HEX = re.compile(r"[0-9a-f]{64}")
_TIMESTAMPED = re.compile(r"t=(?P<t>\d{1,12}),v1=(?P<v1>[0-9a-fA-F]{64})")
#: The header that may carry a timestamped signature.
TIMESTAMPED_HEADER = "x-gantry-signature"


def sign(body: bytes, secret: bytes) -> str:
    """The header value a sender puts on ``body``.

    >>> sign(b"{}", b"s3cret")[:7]
    'sha256='
    """
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def sign_timestamped(body: bytes, secret: bytes, timestamp: int) -> str:
    """The ``X-Gantry-Signature`` value of ``body`` signed at ``timestamp`` (unix time).

    >>> sign_timestamped(b"{}", b"s3cret", 1700000000)[:13]
    't=1700000000,'
    """
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def signed_timestamp(headers: Mapping[str, str]) -> int | None:
    """The ``t`` of a timestamped signature (verify it first); None when there is none."""
    m = _TIMESTAMPED.fullmatch(headers.get(TIMESTAMPED_HEADER, "").strip())
    return int(m["t"]) if m else None


def verify_signature(
    body: bytes,
    headers: Mapping[str, str],
    secret: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> list[str]:
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
        if name == TIMESTAMPED_HEADER and given.startswith("t="):
            _verify_timestamped(body, given, secret, tolerance_s, now)
            continue
        if not given.lower().startswith(_PREFIX):
            raise WebhookSignatureError(f"{name} must have the form sha256=<64 hex digits>")
        digest = given[len(_PREFIX) :].lower()
        if not _HEX.fullmatch(digest):
            raise WebhookSignatureError(f"{name} must have the form sha256=<64 hex digits>")
        if not hmac.compare_digest(expected, (_PREFIX + digest).encode()):
            raise WebhookSignatureError(f"{name} does not match the body and the shared secret")
    return [name for name, _ in present]


def _verify_timestamped(
    body: bytes, value: str, secret: bytes, tolerance_s: float, now: float | None
) -> None:
    m = _TIMESTAMPED.fullmatch(value)
    if not m:
        raise WebhookSignatureError(
            "X-Gantry-Signature must have the form t=<unix time>,v1=<64 hex digits>"
        )
    t = int(m["t"])
    expected = sign_timestamped(body, secret, t).encode()
    if not hmac.compare_digest(expected, f"t={t},v1={m['v1'].lower()}".encode()):
        raise WebhookSignatureError(
            "X-Gantry-Signature does not match the body, its timestamp and the shared secret"
        )
    # Checked after the MAC: an attacker learns nothing from which check failed.
    skew = (time.time() if now is None else now) - t
    if abs(skew) > tolerance_s:
        raise WebhookSignatureError(
            f"the signature's timestamp is {abs(skew):.0f}s {'old' if skew > 0 else 'ahead'}, "
            f"outside the {tolerance_s:g}s the receiver accepts (a replayed delivery?)",
            fix="sign each delivery when it is sent, with this machine's clock in sync",
        )
