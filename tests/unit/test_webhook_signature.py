"""HMAC-SHA256 signatures of webhook bodies (GitHub's and the generic header)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from starlette.datastructures import Headers

from gantry.errors import WebhookSignatureError
from gantry.webhook.signature import sign, verify_signature

pytestmark = pytest.mark.unit

SECRET = b"It's a Secret to Everybody"
BODY = b"Hello, World!"
# The worked example of GitHub's "Validating webhook deliveries" documentation.
GITHUB_DOC_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_sign_matches_githubs_documented_example() -> None:
    assert sign(BODY, SECRET) == GITHUB_DOC_SIGNATURE


@pytest.mark.parametrize("header", ["X-Hub-Signature-256", "X-Gantry-Signature"])
def test_valid_signature_in_either_header(header: str) -> None:
    headers = Headers({header: GITHUB_DOC_SIGNATURE})
    assert verify_signature(BODY, headers, SECRET) == [header.lower()]


def test_upper_case_hex_is_the_same_digest() -> None:
    upper = "sha256=" + GITHUB_DOC_SIGNATURE.removeprefix("sha256=").upper()
    assert verify_signature(BODY, Headers({"X-Gantry-Signature": upper}), SECRET)


def test_both_headers_must_match() -> None:
    good = Headers(
        {"X-Hub-Signature-256": GITHUB_DOC_SIGNATURE, "X-Gantry-Signature": sign(BODY, SECRET)}
    )
    assert len(verify_signature(BODY, good, SECRET)) == 2
    bad_beside_good = Headers(
        {"X-Hub-Signature-256": GITHUB_DOC_SIGNATURE, "X-Gantry-Signature": sign(BODY, b"other")}
    )
    with pytest.raises(WebhookSignatureError, match="x-gantry-signature does not match"):
        verify_signature(BODY, bad_beside_good, SECRET)


def test_missing_signature() -> None:
    with pytest.raises(WebhookSignatureError, match="not signed") as err:
        verify_signature(BODY, Headers({"Content-Type": "application/json"}), SECRET)
    assert err.value.status == 401


@pytest.mark.parametrize(
    ("case", "value"),
    [
        ("other secret", sign(BODY, b"another secret")),
        ("other body", sign(BODY + b" ", SECRET)),
        ("one digit changed", GITHUB_DOC_SIGNATURE[:-1] + "8"),
    ],
)
def test_invalid_signature(case: str, value: str) -> None:
    with pytest.raises(WebhookSignatureError, match="does not match") as err:
        verify_signature(BODY, Headers({"X-Hub-Signature-256": value}), SECRET)
    assert value not in str(err.value), "the header value must never be echoed"


@pytest.mark.parametrize(
    "value",
    [
        # GitHub's legacy SHA-1 header format, under the SHA-256 header name.
        "sha1=" + hmac.new(SECRET, BODY, hashlib.sha1).hexdigest(),
        GITHUB_DOC_SIGNATURE.removeprefix("sha256="),  # no prefix at all
        "sha512=" + hashlib.sha512(BODY).hexdigest(),
        "sha256=" + "0" * 63,  # too short
        "sha256=" + "g" * 64,  # not hex
        "",
    ],
)
def test_wrong_prefix_or_shape(value: str) -> None:
    with pytest.raises(WebhookSignatureError, match="must have the form") as err:
        verify_signature(BODY, Headers({"X-Hub-Signature-256": value}), SECRET)
    if value:
        assert value not in str(err.value)


def test_empty_secret_verifies_nothing() -> None:
    with pytest.raises(WebhookSignatureError, match="no secret"):
        verify_signature(BODY, Headers({"X-Hub-Signature-256": sign(BODY, b"")}), b"")
