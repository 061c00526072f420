"""Cosign's key format and the built-in signer's pure parts, against Go-produced vectors."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gantry.adapters.registry import sha256_digest
from gantry.errors import ImageReferenceError, SigningKeyError
from gantry.signing import keys, simple

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "cosign"


def _body(pem: bytes) -> dict[str, object]:
    block = keys.pem_decode(pem)
    assert block is not None
    return dict(json.loads(block[1]))


# --- the sealed box: go-securesystemslib's vectors -----------------------------------------


def test_go_securesystemslib_vectors_decrypt() -> None:
    data = json.loads((DATA / "securesystemslib-encrypted-vectors.json").read_text())
    for name, vector in data["vectors"].items():
        plain = keys.unseal(vector.encode(), data["passphrase"].encode(), source=name)
        assert plain.decode() == data["plaintext_json"], name


def test_unsupported_scrypt_parameters_are_refused() -> None:
    # Also what keeps a hostile key file from asking for gigabytes of scrypt memory.
    data = json.loads((DATA / "securesystemslib-encrypted-vectors.json").read_text())
    with pytest.raises(SigningKeyError, match="unsupported scrypt parameters N=99"):
        keys.unseal(data["unsupported_params"].encode(), b"supersecret", source="vector")


def test_seal_writes_go_field_order_and_standard_params() -> None:
    sealed = keys.seal(b"payload", b"pw")
    assert sealed.startswith(b'{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"')
    doc = json.loads(sealed)
    assert list(doc) == ["kdf", "cipher", "ciphertext"]
    assert doc["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 32
    assert len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    assert keys.unseal(sealed, b"pw", source="x") == b"payload"


# --- private keys ----------------------------------------------------------------------------


def test_cosign_generated_sigstore_key_decrypts() -> None:
    key = keys.decrypt_private_key((DATA / "sigstore-legacy-hello.key").read_bytes(), "hello")
    assert isinstance(key.curve, ec.SECP256R1)
    # It signs, and its public half verifies what it signed.
    sig = simple.sign_bytes(key, b"x")
    assert simple.verify_bytes(key.public_key(), b"x", sig)


def test_older_cosign_header_is_read() -> None:
    pem = (DATA / "cosign-header-hello.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----")
    key = keys.decrypt_private_key(pem, "hello")
    assert isinstance(key.curve, ec.SECP256R1)


def test_non_p256_key_is_refused_by_name() -> None:
    rsa_der = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = keys.pem_encode(keys.SIGSTORE_PEM_TYPE, keys.seal(rsa_der, b"pw"))
    with pytest.raises(SigningKeyError, match="(?s)RSAPrivateKey key.*ECDSA P-256.*signer: cosign"):
        keys.decrypt_private_key(pem, "pw")


def test_sec1_key_inside_is_refused_like_cosign() -> None:
    # cosign's own test expects "x509: failed to parse private key" for this file.
    with pytest.raises(SigningKeyError, match="does not seal a PKCS#8 private key"):
        keys.decrypt_private_key((DATA / "cosign-sec1-hello.key").read_bytes(), "hello")


@pytest.mark.parametrize("pem_type", [keys.SIGSTORE_PEM_TYPE, keys.COSIGN_PEM_TYPE])
def test_round_trip_with_both_headers(pem_type: str) -> None:
    key = keys.generate_private_key()
    pem = keys.encrypt_private_key(key, "s3cret-pass", pem_type=pem_type)
    assert pem.startswith(f"-----BEGIN {pem_type}-----\n".encode())
    assert all(len(line) <= 64 for line in pem.splitlines())
    back = keys.decrypt_private_key(pem, "s3cret-pass")
    assert keys.key_id(back) == keys.key_id(key)


def test_empty_password_is_allowed() -> None:
    key = keys.generate_private_key()
    back = keys.decrypt_private_key(keys.encrypt_private_key(key, ""), "")
    assert keys.key_id(back) == keys.key_id(key)


def test_wrong_password_names_the_key_and_the_variable() -> None:
    pem = keys.encrypt_private_key(keys.generate_private_key(), "right")
    with pytest.raises(SigningKeyError, match=r"wrong password for /k/cosign.key") as exc:
        keys.decrypt_private_key(pem, "wrong", source="/k/cosign.key", password_env="MY_PW")
    assert "$MY_PW" in str(exc.value)
    assert "right" not in str(exc.value) and "wrong" not in exc.value.fix


def test_tampered_ciphertext_is_refused() -> None:
    pem = keys.encrypt_private_key(keys.generate_private_key(), "pw")
    doc = _body(pem)
    ct = bytearray(base64.b64decode(str(doc["ciphertext"])))
    ct[10] ^= 0x01
    doc["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    tampered = keys.pem_encode(keys.SIGSTORE_PEM_TYPE, json.dumps(doc).encode())
    with pytest.raises(SigningKeyError, match="wrong password .*or the key file was altered"):
        keys.decrypt_private_key(tampered, "pw")


def test_malformed_and_foreign_pem_are_refused() -> None:
    with pytest.raises(SigningKeyError, match="holds no PEM block"):
        keys.decrypt_private_key(b"not a key", "pw")
    plain = keys.generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(SigningKeyError, match="(?s)'PRIVATE KEY' PEM block.*import-key-pair"):
        keys.decrypt_private_key(plain, "pw")
    bad = keys.pem_encode(keys.SIGSTORE_PEM_TYPE, b'{"kdf": 1}')
    with pytest.raises(SigningKeyError, match="not a cosign encrypted private key: malformed"):
        keys.decrypt_private_key(bad, "pw")


# --- files ---------------------------------------------------------------------------------


def test_generate_keypair_files_and_modes(tmp_path: Path) -> None:
    priv, pub = keys.generate_keypair(tmp_path / "keys", "pw")
    assert (priv.name, pub.name) == ("cosign.key", "cosign.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    key = keys.load_private_key(priv, "pw")
    public = keys.load_public_key(pub)
    assert keys.key_id(key) == keys.key_id(public) == keys.fingerprint_pem(pub.read_bytes())
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keys.key_id(public) == hashlib.sha256(der).hexdigest()
    assert [p.name for p in (tmp_path / "keys").iterdir()] != []  # no temp files left
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["cosign.key", "cosign.pub"]


def test_generate_keypair_never_overwrites(tmp_path: Path) -> None:
    priv, _ = keys.generate_keypair(tmp_path, "pw")
    before = priv.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        keys.generate_keypair(tmp_path, "pw")
    assert priv.read_bytes() == before


def test_missing_key_file_names_gantry_keys_generate(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist") as exc:
        keys.load_private_key(tmp_path / "cosign.key", "pw")
    assert "gantry keys generate" in str(exc.value)
    with pytest.raises(SigningKeyError, match="gantry keys generate"):
        keys.load_public_key(tmp_path / "cosign.pub")


# --- payloads and encodings ----------------------------------------------------------------


def test_simple_signing_payload_bytes() -> None:
    digest = "sha256:" + "ab" * 32
    assert simple.simple_signing_payload("127.0.0.1:5000/gantry/x", digest) == (
        b'{"critical":{"identity":{"docker-reference":"127.0.0.1:5000/gantry/x"},'
        b'"image":{"docker-manifest-digest":"sha256:' + b"ab" * 32 + b'"},'
        b'"type":"cosign container image signature"},"optional":null}'
    )
    with_ann = simple.simple_signing_payload("r/x", digest, {"z": "1", "a": "<&>"})
    assert with_ann.endswith(b'"optional":{"a":"\\u003c\\u0026\\u003e","z":"1"}}')


def test_config_blob_is_byte_for_byte_cosigns() -> None:
    """The README's `.sig` manifest names its layer and its config by digest: rebuilding the
    config from that layer must give exactly that config digest."""
    reference = json.loads((DATA / "readme-sig-manifest.json").read_text())
    [ref_layer] = reference["layers"]
    layer = simple.Layer(ref_layer["mediaType"], ref_layer["digest"], ref_layer["size"])
    cfg = simple.config_blob([layer])
    assert len(cfg) == reference["config"]["size"] == 233
    assert sha256_digest(cfg) == reference["config"]["digest"]
    assert cfg == (
        b'{"architecture":"","created":"0001-01-01T00:00:00Z","history":'
        b'[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers",'
        b'"diff_ids":["' + ref_layer["digest"].encode() + b'"]},"config":{}}'
    )
    # Appending extends a stored config, keeping what it already says.
    two = simple.config_blob([layer, layer], json.loads(cfg))
    assert json.loads(two)["rootfs"]["diff_ids"] == [layer.digest, layer.digest]
    assert len(json.loads(two)["history"]) == 2


def test_dsse_envelope_from_cosign_tests_verifies() -> None:
    data = json.loads((DATA / "dsse-envelope-from-cosign-tests.json").read_text())
    public = keys.parse_public_key(data["public_key"].encode())
    raw = json.dumps(data["envelope"]).encode()
    statement = simple._open_envelope(raw, public)
    assert isinstance(statement, bytes)
    assert json.loads(statement)["subject"][0]["digest"]["sha256"] == data["subject_sha256"]
    other = keys.generate_private_key().public_key()
    assert "does not verify" in str(simple._open_envelope(raw, other))


def test_pae_and_own_envelope() -> None:
    assert simple.pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    key = keys.generate_private_key()
    statement = simple.in_toto_statement(
        "r/x", "sha256:" + "cd" * 32, simple.CYCLONEDX_PREDICATE, {"bomFormat": "CycloneDX"}
    )
    env = simple.dsse_envelope(key, simple.IN_TOTO_PAYLOAD_TYPE, statement)
    doc = json.loads(env)
    assert list(doc) == ["payloadType", "payload", "signatures"]
    assert doc["signatures"][0]["keyid"] == ""
    assert simple._open_envelope(env, key.public_key()) == statement
    st = json.loads(statement)
    assert st["_type"] == "https://in-toto.io/Statement/v0.1"
    assert st["subject"] == [{"name": "r/x", "digest": {"sha256": "cd" * 32}}]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("127.0.0.1:5000/a/b:v1", ("127.0.0.1:5000", "a/b", "v1", None)),
        (
            "localhost:5000/a@sha256:" + "1" * 64,
            ("localhost:5000", "a", None, "sha256:" + "1" * 64),
        ),
        ("ghcr.io/o/r:t@sha256:" + "2" * 64, ("ghcr.io", "o/r", "t", "sha256:" + "2" * 64)),
        ("debian:bookworm-slim", ("index.docker.io", "library/debian", "bookworm-slim", None)),
        ("org/app", ("index.docker.io", "org/app", None, None)),
    ],
)
def test_parse_image_ref(image: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = simple.parse_image_ref(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize(
    "image", ["127.0.0.1:5000/A/b", "r/x@sha256:short", "r/x:bad tag", "127.0.0.1:5000/"]
)
def test_parse_image_ref_rejects(image: str) -> None:
    with pytest.raises(ImageReferenceError, match="not an image reference"):
        simple.parse_image_ref(image)


def test_tags_and_predicate_names() -> None:
    digest = "sha256:" + "ef" * 32
    assert simple.signature_tag(digest) == "sha256-" + "ef" * 32 + ".sig"
    assert simple.attestation_tag(digest) == "sha256-" + "ef" * 32 + ".att"
    assert simple.predicate_type_uri("cyclonedx") == "https://cyclonedx.org/bom"
    assert simple.predicate_type_uri("https://x/y") == "https://x/y"
