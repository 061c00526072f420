"""Image signing on the real registry: the built-in signer end to end, the cosign path's
plumbing, and (wherever cosign is installed) a cross-check with the real cosign."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest

from gantry.adapters import docker_engine
from gantry.adapters.cosign import Cosign, RegistryAccess, SigningKey
from gantry.adapters.registry import OCI_CONFIG, OCI_MANIFEST, RegistryClient, sha256_digest
from gantry.errors import (
    RegistryError,
    SignatureVerificationError,
    SigningConfigError,
    SigningKeyError,
    ToolNotFoundError,
)
from gantry.signing import image as signing
from gantry.signing import simple
from gantry.spec import SignOptions
from tests.support import SHARED_CACHE, GantryEnv

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
BUILTIN = SignOptions(signer="builtin")
SBOM = {
    "bomFormat": "CycloneDX",
    "specVersion": "1.5",
    "version": 1,
    "components": [{"type": "library", "name": "onnxruntime", "version": "1.20.1"}],
}


def _pw(_: SignOptions) -> str:
    return PASSWORD


@dataclass
class Images:
    registry: str
    repository: str  # path in the registry
    repo: str  # <registry>/<repository>
    digest_a: str
    digest_b: str
    id_a: str


@dataclass
class Keys:
    dir: Path
    priv: Path
    pub: Path


@pytest.fixture(scope="module")
def client(gantry_env: GantryEnv) -> Iterator[docker.DockerClient]:
    import logging

    from gantry.localenv.baseimages import ensure_base_image

    c = docker_engine.connect(300)
    # The images under test are built FROM it: a stand-in where it cannot be pulled.
    ensure_base_image(
        "debian:bookworm-slim",
        docker_client=c,
        work_dir=SHARED_CACHE / "base-images",
        log=logging.getLogger(__name__),
    )
    yield c
    c.close()


def _build(client: docker.DockerClient, ref: str, label: str) -> str:
    dockerfile = f"FROM debian:bookworm-slim\nLABEL ai.gantry.test.signing={label}\n"
    image, _ = client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=ref, pull=False, rm=True
    )
    return str(image.id)


@pytest.fixture(scope="module")
def images(gantry_env: GantryEnv, client: docker.DockerClient) -> Iterator[Images]:
    """Two tiny images, A (pushed as :v1) and B (pushed as :other)."""
    repository = f"gantry-test/sign-{secrets.token_hex(4)}"
    repo = f"{gantry_env.registry}/{repository}"
    built = [_build(client, f"{repo}:v1", "a-" + repository[-8:])]
    built.append(_build(client, f"{repo}:other", "b-" + repository[-8:]))
    try:
        digest_a = docker_engine.push(client, repo, "v1", timeout_s=300)
        digest_b = docker_engine.push(client, repo, "other", timeout_s=300)
        yield Images(gantry_env.registry, repository, repo, digest_a, digest_b, built[0])
    finally:
        for image_id in built:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image_id, force=True)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = signing.generate_keypair(d, PASSWORD)
    return Keys(d, priv, pub)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("other-keys")
    priv, pub = signing.generate_keypair(d, PASSWORD)
    return Keys(d, priv, pub)


@pytest.fixture(scope="module")
def signed(images: Images, key: Keys) -> signing.ImageSignature:
    return signing.sign_image(f"{images.repo}:v1", BUILTIN, key.dir, password_provider=_pw)


def _reg(images: Images) -> RegistryClient:
    return RegistryClient(images.registry)


# --- sign and verify ---------------------------------------------------------------------


def test_sign_then_verify(signed: signing.ImageSignature, images: Images, key: Keys) -> None:
    assert signed.digest == images.digest_a
    assert signed.image == f"{images.repo}@{images.digest_a}"
    assert signed.signature_tag == simple.signature_tag(images.digest_a)
    assert (signed.signer, signed.tlog, signed.newly_signed) == ("builtin", False, True)
    assert signed.public_key_path == str(key.pub)
    assert signed.key_id and len(signed.key_id) == 64

    by_digest = signing.verify_image(f"{images.repo}@{images.digest_a}", key.pub)
    assert by_digest.signer == "builtin" and by_digest.key_id == signed.key_id
    assert by_digest.signature_ref == f"{images.repo}:{signed.signature_tag}"
    assert signed.signature_ref == by_digest.signature_ref
    [payload] = by_digest.payloads
    assert payload["critical"] == {
        "identity": {"docker-reference": images.repo},
        "image": {"docker-manifest-digest": images.digest_a},
        "type": "cosign container image signature",
    }
    by_tag = signing.verify_image(f"{images.repo}:v1", key.pub)
    assert by_tag.digest == images.digest_a


def test_signing_again_adds_nothing(
    signed: signing.ImageSignature, images: Images, key: Keys
) -> None:
    again = signing.sign_image(
        f"{images.repo}@{images.digest_a}", BUILTIN, key.dir, password_provider=_pw
    )
    assert again.newly_signed is False
    assert again.signature_manifest_digest == signed.signature_manifest_digest
    with _reg(images) as reg:
        manifest = reg.get_manifest(images.repository, signed.signature_tag)
    assert manifest is not None and len(manifest.json()["layers"]) == 1


def test_second_key_appends_a_layer_and_both_verify(
    signed: signing.ImageSignature, images: Images, key: Keys, other_key: Keys
) -> None:
    second = signing.sign_image(
        f"{images.repo}@{images.digest_a}", BUILTIN, other_key.dir, password_provider=_pw
    )
    assert second.newly_signed is True
    with _reg(images) as reg:
        manifest = reg.get_manifest(images.repository, signed.signature_tag)
        assert manifest is not None
        doc = manifest.json()
        config = json.loads(reg.get_blob(images.repository, doc["config"]["digest"]))
    assert len(doc["layers"]) == 2
    assert config["rootfs"]["diff_ids"] == [ly["digest"] for ly in doc["layers"]]
    for k in (key, other_key):
        assert signing.verify_image(f"{images.repo}@{images.digest_a}", k.pub).payloads


def test_sig_tag_is_an_oci_manifest_the_registry_serves(
    signed: signing.ImageSignature, images: Images
) -> None:
    base = f"http://{images.registry}/v2/{images.repository}"
    r = httpx.get(f"{base}/manifests/{signed.signature_tag}", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_MANIFEST
    assert r.headers["Docker-Content-Digest"] == sha256_digest(r.content)
    doc = r.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_MANIFEST
    assert doc["config"]["mediaType"] == OCI_CONFIG
    config = httpx.get(f"{base}/blobs/{doc['config']['digest']}", follow_redirects=True)
    assert sha256_digest(config.content) == doc["config"]["digest"]
    assert len(config.content) == doc["config"]["size"]
    layer = doc["layers"][0]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    payload = httpx.get(f"{base}/blobs/{layer['digest']}", follow_redirects=True).content
    assert sha256_digest(payload) == layer["digest"] and len(payload) == layer["size"]
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == signed.digest
    tags = httpx.get(f"{base}/tags/list").json()["tags"]
    assert signed.signature_tag in tags and "v1" in tags


def test_image_still_pulls_by_digest_after_signing(
    signed: signing.ImageSignature, images: Images, client: docker.DockerClient
) -> None:
    ref = f"{images.repo}@{images.digest_a}"
    client.images.remove(images.id_a, force=True)  # so the pull has to fetch it
    pulled = client.images.pull(images.repo, tag=images.digest_a)
    assert pulled.id == images.id_a
    assert ref in pulled.attrs["RepoDigests"]


# --- failures ----------------------------------------------------------------------------


def test_other_key_does_not_verify(images: Images, other_key: Keys, tmp_path: Path) -> None:
    stranger = signing.generate_keypair(tmp_path, PASSWORD)[1]
    # B is signed by nobody yet; sign it with other_key only and verify with a third key.
    signing.sign_image(
        f"{images.repo}@{images.digest_b}", BUILTIN, other_key.dir, password_provider=_pw
    )
    with pytest.raises(SignatureVerificationError) as exc:
        signing.verify_image(f"{images.repo}@{images.digest_b}", stranger)
    msg = str(exc.value)
    assert "does not verify with key" in msg and "signed by another key" in msg
    assert images.digest_b in msg


def test_corrupted_signature_annotation(
    signed: signing.ImageSignature, images: Images, key: Keys
) -> None:
    with _reg(images) as reg:
        original = reg.get_manifest(images.repository, signed.signature_tag)
        assert original is not None
        doc = original.json()
        try:
            for layer in doc["layers"]:
                sig = bytearray(base64.b64decode(layer["annotations"][simple.SIGNATURE_ANNOTATION]))
                sig[-1] ^= 0x01
                layer["annotations"][simple.SIGNATURE_ANNOTATION] = base64.b64encode(sig).decode()
            raw = json.dumps(doc).encode()
            reg.put_manifest(images.repository, signed.signature_tag, raw, OCI_MANIFEST)
            with pytest.raises(SignatureVerificationError, match="does not verify with key"):
                signing.verify_image(f"{images.repo}@{images.digest_a}", key.pub)
            for layer in doc["layers"]:
                layer["annotations"][simple.SIGNATURE_ANNOTATION] = "!!not base64!!"
            raw = json.dumps(doc).encode()
            reg.put_manifest(images.repository, signed.signature_tag, raw, OCI_MANIFEST)
            with pytest.raises(SignatureVerificationError, match="not base64 .corrupted."):
                signing.verify_image(f"{images.repo}@{images.digest_a}", key.pub)
        finally:
            reg.put_manifest(
                images.repository, signed.signature_tag, original.raw, original.media_type
            )
    assert signing.verify_image(f"{images.repo}@{images.digest_a}", key.pub).payloads


def test_signature_copied_to_another_digest_is_refused(
    signed: signing.ImageSignature, images: Images, key: Keys
) -> None:
    """A's valid signature manifest placed under B's .sig tag: says which digest it is for."""
    with _reg(images) as reg:
        manifest = reg.get_manifest(images.repository, signed.signature_tag)
        assert manifest is not None
        tag_b = simple.signature_tag(images.digest_b)
        saved = reg.get_manifest(images.repository, tag_b)
        reg.put_manifest(images.repository, tag_b, manifest.raw, manifest.media_type)
        try:
            with pytest.raises(SignatureVerificationError) as exc:
                signing.verify_image(f"{images.repo}@{images.digest_b}", key.pub)
        finally:
            if saved is not None:
                reg.put_manifest(images.repository, tag_b, saved.raw, saved.media_type)
    assert f"is for another digest: {images.digest_a}, not {images.digest_b}" in str(exc.value)


def test_repointed_tag_is_detected(
    signed: signing.ImageSignature, images: Images, key: Keys, client: docker.DockerClient
) -> None:
    # A brand-new image C under :v1 (B may carry other tests' signatures).
    c_id = _build(client, f"{images.repo}:v1", "c-" + secrets.token_hex(4))
    try:
        digest_c = docker_engine.push(client, images.repo, "v1", timeout_s=300)
        assert digest_c != images.digest_a
        with pytest.raises(SignatureVerificationError) as exc:
            signing.verify_image(f"{images.repo}:v1", key.pub)
        msg = str(exc.value)
        assert f"no signature for {images.repo}@{digest_c}" in msg
        assert f"{images.repo}:v1 (resolves to {digest_c})" in msg
        # The digest that was signed still verifies.
        assert signing.verify_image(f"{images.repo}@{images.digest_a}", key.pub).payloads
    finally:
        client.images.remove(c_id, force=True)


def test_unsigned_digest_says_no_signature(images: Images, key: Keys) -> None:
    digest = "sha256:" + "0" * 64
    with pytest.raises(SignatureVerificationError, match="no signature for .* has no tag sha256-0"):
        signing.verify_image(f"{images.repo}@{digest}", key.pub)
    with pytest.raises(RegistryError, match="no such manifest"):
        signing.sign_image(f"{images.repo}@{digest}", BUILTIN, key.dir, password_provider=_pw)


# --- attestations ------------------------------------------------------------------------


def test_attest_sbom_then_verify(images: Images, key: Keys, other_key: Keys) -> None:
    image = f"{images.repo}@{images.digest_a}"
    sbom = json.dumps(SBOM).encode()
    ref = signing.attest(image, "cyclonedx", sbom, BUILTIN, key.dir, password_provider=_pw)
    assert ref.predicate_type == "https://cyclonedx.org/bom"
    assert ref.attestation_tag == simple.attestation_tag(images.digest_a)
    assert ref.reference == f"{images.repo}:{ref.attestation_tag}"
    scan = {"verdict": "pass", "critical": 0, "high": 2, "db": "2024-01-01"}
    signing.attest(
        image, simple.GANTRY_SCAN_PREDICATE, scan, BUILTIN, key.dir, password_provider=_pw
    )
    again = signing.attest(image, "cyclonedx", SBOM, BUILTIN, key.dir, password_provider=_pw)
    assert again.envelope_digest == ref.envelope_digest  # identical statement: not re-added

    verified = signing.verify_attestation(image, key.pub, "cyclonedx")
    [statement] = verified.statements
    assert statement["predicate"] == SBOM
    assert statement["subject"] == [
        {"name": images.repo, "digest": {"sha256": images.digest_a.removeprefix("sha256:")}}
    ]
    [scan_statement] = signing.verify_attestation(
        image, key.pub, simple.GANTRY_SCAN_PREDICATE
    ).statements
    assert scan_statement["predicate"] == scan

    with _reg(images) as reg:
        manifest = reg.get_manifest(images.repository, ref.attestation_tag)
    assert manifest is not None and manifest.media_type == OCI_MANIFEST
    layers = manifest.json()["layers"]
    assert [ly["mediaType"] for ly in layers] == [simple.DSSE_MEDIA_TYPE] * 2
    assert layers[0]["annotations"] == {
        "dev.cosignproject.cosign/signature": "",
        "predicateType": "https://cyclonedx.org/bom",
    }

    with pytest.raises(SignatureVerificationError, match="no attestation of type https://spdx"):
        signing.verify_attestation(image, key.pub, "spdxjson")
    with pytest.raises(SignatureVerificationError, match="does not verify with key"):
        signing.verify_attestation(image, other_key.pub, "cyclonedx")
    with pytest.raises(SignatureVerificationError, match="no attestation for"):
        signing.verify_attestation(f"{images.repo}@{images.digest_b}", key.pub, "cyclonedx")


def test_attest_replace(images: Images, key: Keys) -> None:
    image = f"{images.repo}@{images.digest_b}"
    signing.attest(image, "cyclonedx", {"v": 1}, BUILTIN, key.dir, password_provider=_pw)
    signing.attest(
        image, "cyclonedx", {"v": 2}, BUILTIN, key.dir, password_provider=_pw, replace=True
    )
    [statement] = signing.verify_attestation(image, key.pub, "cyclonedx").statements
    assert statement["predicate"] == {"v": 2}


# --- keys and options --------------------------------------------------------------------


def test_wrong_password(images: Images, key: Keys) -> None:
    with pytest.raises(SigningKeyError, match="wrong password for") as exc:
        signing.sign_image(
            f"{images.repo}@{images.digest_a}",
            BUILTIN,
            key.dir,
            password_provider=lambda _: "not the password",
        )
    assert "$COSIGN_PASSWORD" in str(exc.value)
    assert "not the password" not in str(exc.value) and PASSWORD not in str(exc.value)


def test_password_from_the_named_variable(
    images: Images, key: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = SignOptions(signer="builtin", password_env="GANTRY_TEST_SIGN_PW")
    monkeypatch.delenv("GANTRY_TEST_SIGN_PW", raising=False)
    with pytest.raises(SigningKeyError, match=r"\$GANTRY_TEST_SIGN_PW is not set"):
        signing.sign_image(f"{images.repo}@{images.digest_a}", options, key.dir)
    monkeypatch.setenv("GANTRY_TEST_SIGN_PW", PASSWORD)
    assert signing.sign_image(f"{images.repo}@{images.digest_a}", options, key.dir).key_id


def test_key_file_in_place_of_the_key_dir(images: Images, key: Keys) -> None:
    sig = signing.sign_image(
        f"{images.repo}@{images.digest_a}", BUILTIN, key.priv, password_provider=_pw
    )
    assert sig.public_key_path == str(key.pub) and sig.newly_signed is False


def test_missing_key_file(images: Images, tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist") as exc:
        signing.sign_image(
            f"{images.repo}@{images.digest_a}", BUILTIN, tmp_path, password_provider=_pw
        )
    assert "gantry keys generate" in str(exc.value)
    assert str(tmp_path / "cosign.key") in str(exc.value)
    with pytest.raises(SigningKeyError, match="gantry keys generate"):
        signing.verify_image(f"{images.repo}@{images.digest_a}", tmp_path / "cosign.pub")


def test_builtin_refuses_tlog_kms_and_keyless(images: Images, key: Keys) -> None:
    image = f"{images.repo}@{images.digest_a}"
    with pytest.raises(SigningConfigError, match="no transparency log") as exc:
        signing.sign_image(
            image, SignOptions(signer="builtin", tlog_upload=True), key.dir, password_provider=_pw
        )
    assert "signer: cosign" in str(exc.value)
    for method in ("kms", "keyless"):
        options = SignOptions(
            signer="builtin",
            method=method,
            kms_uri="awskms:///alias/x",
            certificate_identity="ci@acme.example",
            certificate_oidc_issuer="https://issuer.example",
        )
        with pytest.raises(SigningConfigError, match=f"cannot sign with method '{method}'"):
            signing.sign_image(image, options, key.dir, password_provider=_pw)


def test_auto_picks_builtin_without_cosign(
    images: Images, key: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COSIGN_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    sig = signing.sign_image(
        f"{images.repo}@{images.digest_a}", SignOptions(), key.dir, password_provider=_pw
    )
    assert sig.signer == "builtin"


# --- the cosign path, with a stand-in binary ---------------------------------------------

FAKE = """\
import json, os, sys
with open(os.environ["FAKE_COSIGN_RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "pw": os.environ.get("COSIGN_PASSWORD")}) + "\\n")
if sys.argv[1] == "version":
    print('{"gitVersion": "v2.4.1"}')
"""


def test_cosign_path_signs_by_digest_with_env_password(
    images: Images, key: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "cosign"
    fake.write_text(f"#!{sys.executable}\n{FAKE}")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_COSIGN_RECORD", str(record))
    monkeypatch.setenv("COSIGN_BIN", str(fake))
    sig = signing.sign_image(
        f"{images.repo}:other", SignOptions(signer="cosign"), key.dir, password_provider=_pw
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls[-1] == {
        "argv": [
            "sign", "--yes", "--key", str(key.priv), "--tlog-upload=false",
            "--allow-http-registry", f"{images.repo}@{images.digest_b}",
        ],
        "pw": PASSWORD,
    }  # fmt: skip
    assert sig.signer == "cosign" and sig.digest == images.digest_b
    assert sig.public_key_path == str(key.pub) and sig.key_id


VERIFYING_FAKE = (
    FAKE
    + """\
if sys.argv[1] == "verify":
    print('[{"critical": {"type": "cosign container image signature"}, "optional": {}}]')
"""
)


def test_verification_uses_how_the_image_was_signed(
    images: Images, key: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A KMS or keyless signature is verified with that KMS key or that identity (through
    cosign), a Rekor-logged one with Rekor; never with the default key pair instead."""
    from gantry.stages.sign import SignResult

    fake = tmp_path / "cosign"
    fake.write_text(f"#!{sys.executable}\n{VERIFYING_FAKE}")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_COSIGN_RECORD", str(record))
    monkeypatch.setenv("COSIGN_BIN", str(fake))
    image = f"{images.repo}@{images.digest_b}"
    base = {
        "image": image, "signer": "cosign", "signature_ref": "x", "public_key": "",
        "attestations": {}, "weights_signature": "w", "weights_public_key": "p",
        "weights_key_fingerprint": "f", "keys_generated": False, "cached": False,
        "sign_seconds": 0.0,
    }  # fmt: skip
    kms = SignResult(**base, method="kms", kms_uri="awskms:///alias/gantry", tlog=True)
    keyless = SignResult(
        **base,
        method="keyless",
        tlog=True,
        certificate_identity="https://github.com/acme/ci/.github/workflows/release.yml@main",
        certificate_oidc_issuer="https://token.actions.githubusercontent.com",
    )
    for result in (kms, keyless):
        verified = signing.verify_image(image, None, options=result.verification())
        assert verified.signer == "cosign" and verified.key_id is None
    calls = [json.loads(line)["argv"] for line in record.read_text().splitlines()]
    verifies = [c for c in calls if c[0] == "verify"]
    assert verifies[0][:3] == ["verify", "--key", "awskms:///alias/gantry"]
    assert "--insecure-ignore-tlog=true" not in verifies[0]  # it was logged in Rekor
    assert verifies[1][1:5] == [
        "--certificate-identity", keyless.certificate_identity,
        "--certificate-oidc-issuer", keyless.certificate_oidc_issuer,
    ]  # fmt: skip
    # A key signature recorded as logged in Rekor: the built-in verifier cannot check
    # Rekor, so it refuses rather than pass on the signature alone.
    monkeypatch.delenv("COSIGN_BIN")
    logged = SignResult(**{**base, "public_key": str(key.pub)}, tlog=True)
    with pytest.raises(SigningConfigError):
        signing.verify_image(
            image, key.pub, options=logged.verification().model_copy(update={"signer": "builtin"})
        )
    with pytest.raises(ToolNotFoundError):
        signing.verify_image(image, key.pub, options=logged.verification())


def test_a_changed_attestation_is_made_again_an_unchanged_one_is_not(
    images: Images, key: Keys
) -> None:
    """Signature reuse (sign stage) keeps an attestation only when its predicate is the one
    to attest now: a re-scan's new result is attested, the old one no longer counts."""
    from gantry.keyring import KeyPaths
    from gantry.stages.sign import _already_attested

    image = f"{images.repo}@{images.digest_a}"
    keys = KeyPaths(
        image_key=str(key.priv), image_pub=str(key.pub), weights_key="-", weights_pub="-"
    )
    kind = "https://gantry.dev/attestations/test-reattest/v1"
    first = json.dumps({"passed": True, "scan_seconds": 1.0}).encode()
    signing.attest(
        image,
        "https://gantry.dev/attestations/test-reattest/v1",
        first,
        BUILTIN,
        key.dir,
        password_provider=_pw,
    )
    assert _already_attested(image, keys, BUILTIN, kind, first)
    changed = json.dumps({"passed": False, "scan_seconds": 2.0}).encode()
    assert not _already_attested(image, keys, BUILTIN, kind, changed)


# --- the real cosign ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cosign") is None, reason="cosign is not installed here")
def test_real_cosign_cross_check(
    images: Images, key: Keys, client: docker.DockerClient, tmp_path: Path
) -> None:
    """Built-in ↔ cosign, both ways, for signatures and attestations."""
    runner = Cosign.find(registry=RegistryAccess(plain_http=True))
    pub = SigningKey("key", str(key.pub))
    # Built-in signs, cosign verifies.
    built_in = f"{images.repo}@{images.digest_a}"
    signing.sign_image(built_in, BUILTIN, key.dir, password_provider=_pw)
    payloads = runner.verify(built_in, key=pub, tlog=False)
    assert payloads and payloads[0]["critical"]["image"]["docker-manifest-digest"] == (
        images.digest_a
    )
    signing.attest(built_in, "cyclonedx", SBOM, BUILTIN, key.dir, password_provider=_pw)
    statements = runner.verify_attestation(
        built_in, key=pub, predicate_type="cyclonedx", tlog=False
    )
    assert any(s["predicate"] == SBOM for s in statements)
    # cosign signs a fresh image, the built-in verifier verifies.
    d_id = _build(client, f"{images.repo}:cosign", secrets.token_hex(4))
    try:
        digest_d = docker_engine.push(client, images.repo, "cosign", timeout_s=300)
        by_cosign = f"{images.repo}@{digest_d}"
        runner.sign(
            by_cosign, key=SigningKey("key", str(key.priv)), password=PASSWORD, tlog_upload=False
        )
        assert signing.verify_image(by_cosign, key.pub).payloads
        predicate = json.dumps(SBOM).encode()
        runner.attest(
            by_cosign,
            key=SigningKey("key", str(key.priv)),
            password=PASSWORD,
            tlog_upload=False,
            predicate=predicate,
            predicate_type="cyclonedx",
        )
        [statement] = signing.verify_attestation(by_cosign, key.pub, "cyclonedx").statements
        assert statement["predicate"] == SBOM
    finally:
        client.images.remove(d_id, force=True)
