"""Weights signing with the real OpenSSF model-signing, on a snapshot laid out like the cache.

The snapshot is a tree of read-only hard links to content-addressed blobs, with its
manifest beside it, as the weights stage builds it. Keyless signing runs against
in-process loopback stubs (no network): only its deadlines and errors are checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sigstore
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gantry.adapters.model_signing import (
    IGNORED_PATHS,
    KeylessIdentity,
    KeylessOptions,
    WeightsSignature,
    fingerprint,
    generate_weights_key,
    sign_weights,
    verify_weights,
)
from gantry.errors import SigstoreUnavailableError, WeightsKeyError, WeightsSignatureError
from gantry.manifest import ManifestEntry, WeightsManifest, sha256_file

pytestmark = pytest.mark.unit

PASSWORD = "correct horse"
FILES = {
    "config.json": b'{"hidden_size": 32, "num_attention_heads": 2}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "WordPiece"}}\n',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n",
    "1_Pooling/config.json": b'{"word_embedding_dimension": 32}\n',
    "onnx/model.onnx": random.Random(7).randbytes(5 * 2**20),
}


@dataclass
class Snapshot:
    dir: Path
    manifest: WeightsManifest
    sig: Path


def _build_snapshot(root: Path) -> Snapshot:
    """A weights cache like the weights stage's: blobs, hard-linked snapshot, manifest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    snap = root / "snapshots" / "acme" / "mini" / f"{'c' * 40}.0123456789"
    entries = []
    for rel, data in FILES.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = blobs / sha
        blob.write_bytes(data)
        blob.chmod(0o444)  # cached weights are read-only
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(blob, snap / rel)
        entries.append(ManifestEntry(path=rel, size=len(data), sha256=sha))
    manifest = WeightsManifest.build("acme/mini", "c" * 40, entries)
    snap.with_name(snap.name + ".manifest.json").write_text(manifest.model_dump_json())
    return Snapshot(snap, manifest, snap.with_name(snap.name + ".sig.json"))


def _disk_manifest(snap: Path) -> WeightsManifest:
    files = sorted(p for p in snap.rglob("*") if p.is_file())
    return WeightsManifest.build(
        "acme/mini",
        "c" * 40,
        [
            ManifestEntry(
                path=p.relative_to(snap).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
            )
            for p in files
        ],
    )


def _edit(path: Path, data: bytes | None = None, *, flip_at: int | None = None) -> None:
    path.chmod(0o644)
    if flip_at is not None:
        raw = bytearray(path.read_bytes())
        raw[flip_at] ^= 0x01
        data = bytes(raw)
    assert data is not None
    path.write_bytes(data)
    path.chmod(0o444)


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    return _build_snapshot(tmp_path / "weights")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("keys")
    return {
        "a": generate_weights_key(base / "a", PASSWORD),
        "b": generate_weights_key(base / "b", PASSWORD),
        "plain": generate_weights_key(base / "plain", None),
    }


def _sign(s: Snapshot, key: tuple[Path, Path], password: str | None = PASSWORD) -> WeightsSignature:
    return sign_weights(
        s.dir, private_key=key[0], password=password, signature_path=s.sig, manifest=s.manifest
    )


# --- keys -------------------------------------------------------------------------------


def test_generated_keys_are_pem_p256_and_the_private_one_is_private(tmp_path: Path) -> None:
    priv, pub = generate_weights_key(tmp_path / "k", PASSWORD)
    assert (priv.name, pub.name) == ("weights.key", "weights.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(priv.read_bytes(), PASSWORD.encode())
    loaded_pub = serialization.load_pem_public_key(pub.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded_pub, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == loaded_pub.public_numbers()
    assert loaded_pub.curve.name == "secp256r1"

    plain, _ = generate_weights_key(tmp_path / "p", None)
    assert plain.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    with pytest.raises(WeightsKeyError, match="already exist"):
        generate_weights_key(tmp_path / "k", PASSWORD)  # never overwrites a key


# --- sign and verify --------------------------------------------------------------------


def test_sign_then_verify(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    before = _disk_manifest(snapshot.dir)
    assert before.digest == snapshot.manifest.digest
    listing = sorted(p.relative_to(snapshot.dir) for p in snapshot.dir.rglob("*"))
    dirs = [snapshot.dir, *(p for p in snapshot.dir.rglob("*") if p.is_dir())]
    dir_mtimes = [d.stat().st_mtime_ns for d in dirs]

    sig = _sign(snapshot, keys["a"])

    # Beside the snapshot, next to its manifest; nothing inside changed.
    assert Path(sig.path) == snapshot.sig and snapshot.sig.is_file()
    assert snapshot.sig.parent == snapshot.dir.parent
    assert sorted(p.relative_to(snapshot.dir) for p in snapshot.dir.rglob("*")) == listing
    assert [d.stat().st_mtime_ns for d in dirs] == dir_mtimes  # not even a temp file inside
    assert _disk_manifest(snapshot.dir).digest == snapshot.manifest.digest
    assert stat.S_IMODE(snapshot.sig.stat().st_mode) == 0o644

    pub = serialization.load_pem_public_key(keys["a"][1].read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert sig.method == "key" and not sig.reused
    assert sig.public_key_fingerprint == fingerprint(pub)
    assert sig.files == len(FILES) and sig.manifest_digest == snapshot.manifest.digest
    assert sig.model_signing_version.startswith("1.")
    bundle = json.loads(snapshot.sig.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"

    ok = verify_weights(
        snapshot.dir,
        signature_path=snapshot.sig,
        public_key=keys["a"][1],
        manifest=snapshot.manifest,
    )
    assert ok.files == len(FILES) and ok.content_digest == sig.content_digest
    assert ok.manifest_digest == snapshot.manifest.digest


def test_a_flipped_byte_is_named(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    _sign(snapshot, keys["a"])
    _edit(snapshot.dir / "onnx" / "model.onnx", flip_at=3 * 2**20)
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "content"
    assert e.value.changed == ("onnx/model.onnx",) and not e.value.added and not e.value.removed
    assert "changed: onnx/model.onnx" in str(e.value) and "re-run the release" in str(e.value)


def test_an_added_file_fails(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    _sign(snapshot, keys["a"])
    (snapshot.dir / "onnx" / "extra.onnx").write_bytes(b"not signed")
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "content" and e.value.added == ("onnx/extra.onnx",)
    assert "added (not in its signature): onnx/extra.onnx" in str(e.value)


def test_a_removed_file_fails(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    _sign(snapshot, keys["a"])
    (snapshot.dir / "vocab.txt").unlink()
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "content" and e.value.removed == ("vocab.txt",)
    assert "removed: vocab.txt" in str(e.value)


def test_another_key_fails(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    _sign(snapshot, keys["a"])
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["b"][1])
    assert e.value.reason == "wrong_key" and "signed with another key" in str(e.value)


def test_an_edited_signature_fails(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    _sign(snapshot, keys["a"])
    bundle = json.loads(snapshot.sig.read_text())
    raw = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[10] ^= 0xFF
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    snapshot.sig.write_text(json.dumps(bundle))
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "invalid"

    snapshot.sig.write_text("{not json")
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "malformed"


def test_missing_signature_says_to_sign(
    snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]
) -> None:
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])
    assert e.value.reason == "missing"
    assert str(snapshot.sig) in str(e.value) and "sign stage" in e.value.fix


def test_wrong_or_missing_password(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    priv = keys["a"][0]
    with pytest.raises(WeightsKeyError, match=r"wrong password .*\n  fix: set \$WEIGHTS_PW"):
        sign_weights(
            snapshot.dir,
            private_key=priv,
            password="nope",
            signature_path=snapshot.sig,
            password_env="WEIGHTS_PW",
        )
    with pytest.raises(WeightsKeyError, match="encrypted and no password"):
        sign_weights(snapshot.dir, private_key=priv, password=None, signature_path=snapshot.sig)
    with pytest.raises(WeightsKeyError, match="does not exist"):
        sign_weights(
            snapshot.dir,
            private_key=priv.with_name("nope.key"),
            password=None,
            signature_path=snapshot.sig,
        )
    assert not snapshot.sig.exists()
    # A password meant for another key does not break an unencrypted one.
    assert _sign(snapshot, keys["plain"], password="for-cosign").files == len(FILES)


def test_traditional_openssl_keys_work_too(snapshot: Snapshot, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = tmp_path / "trad.key", tmp_path / "trad.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert _sign(snapshot, (priv, pub)).files == len(FILES)
    verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=pub)


def test_resigning_is_idempotent(snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]) -> None:
    first = _sign(snapshot, keys["a"])
    raw, mtime = snapshot.sig.read_bytes(), snapshot.sig.stat().st_mtime_ns
    again = _sign(snapshot, keys["a"])
    assert again.reused and not first.reused
    assert snapshot.sig.read_bytes() == raw and snapshot.sig.stat().st_mtime_ns == mtime
    assert again.content_digest == first.content_digest and again.files == first.files
    assert abs((again.signed_at - first.signed_at).total_seconds()) < 2

    # Another key: signed again, and the new signature verifies with that key only.
    other = _sign(snapshot, keys["b"])
    assert not other.reused and other.public_key_fingerprint != first.public_key_fingerprint
    verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["b"][1])
    assert not list(snapshot.dir.parent.glob(".*.tmp"))  # no temp file left beside it


def test_signing_refuses_content_that_is_not_the_manifest(
    snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]
) -> None:
    _edit(snapshot.dir / "config.json", b'{"hidden_size": 64}\n')
    with pytest.raises(WeightsSignatureError) as e:
        _sign(snapshot, keys["a"])
    assert e.value.changed == ("config.json",) and "their manifest" in str(e.value)
    assert not snapshot.sig.exists()  # nothing signed


def test_junk_in_ignored_dirs_is_not_signed(
    snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]
) -> None:
    assert ".cache" in IGNORED_PATHS
    junk = snapshot.dir / ".cache" / "huggingface" / "download"
    junk.mkdir(parents=True)
    (junk / "model.onnx.lock").write_text("")
    assert _sign(snapshot, keys["a"]).files == len(FILES)
    (junk / "model.onnx.metadata").write_text("later junk")
    verify_weights(snapshot.dir, signature_path=snapshot.sig, public_key=keys["a"][1])


def test_symlinks_and_bad_paths_are_refused(
    snapshot: Snapshot, keys: dict[str, tuple[Path, Path]]
) -> None:
    with pytest.raises(ValueError, match="outside"):
        sign_weights(
            snapshot.dir,
            private_key=keys["a"][0],
            password=PASSWORD,
            signature_path=snapshot.dir / "sig.json",
        )
    (snapshot.dir / "link.json").symlink_to("config.json")
    with pytest.raises(WeightsSignatureError) as e:
        sign_weights(
            snapshot.dir, private_key=keys["a"][0], password=PASSWORD, signature_path=snapshot.sig
        )
    assert e.value.reason == "unsupported" and "symlink" in str(e.value)


# --- keyless: only the failure paths can run without network ----------------------------


def _b64(doc: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def _token(issuer: str) -> str:
    """An unsigned OIDC token: sigstore-python only decodes it; Fulcio would check it."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": "ci@example.com",
        "aud": "sigstore",
        "iat": now,
        "exp": now + 600,
    }
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


class _Stub(BaseHTTPRequestHandler):
    """OIDC discovery answers; every other request hangs, like a black-holed Fulcio."""

    release = threading.Event()

    def do_GET(self) -> None:
        if not self.path.endswith("/.well-known/openid-configuration"):
            self.release.wait(60)
            return
        base = f"http://{self.headers['Host']}"
        body = json.dumps({"authorization_endpoint": base, "token_endpoint": base}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.release.wait(60)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Stub.release.set()
        server.shutdown()
        server.server_close()
        _Stub.release.clear()


def _trust_config(tmp_path: Path, url: str) -> Path:
    """Sigstore's bundled production trust root, with every service moved to ``url``."""
    store = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    signing_config = json.loads((store / "signing_config.v0.2.json").read_text())
    for kind in ("caUrls", "oidcUrls", "rekorTlogUrls"):
        for svc in signing_config[kind]:
            svc["url"] = url
    signing_config["tsaUrls"] = []
    path = tmp_path / "trust_config.json"
    path.write_text(
        json.dumps(
            {
                "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
                "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
                "signingConfig": signing_config,
            }
        )
    )
    return path


def _sign_keyless(s: Snapshot, opts: KeylessOptions) -> WeightsSignature:
    return sign_weights(
        s.dir, private_key=None, password=None, signature_path=s.sig, method="keyless", keyless=opts
    )


def test_keyless_without_a_token_fails_at_once(snapshot: Snapshot) -> None:
    with pytest.raises(WeightsKeyError, match="needs an OIDC identity token"):
        _sign_keyless(snapshot, KeylessOptions(use_ambient_credentials=False))


def test_keyless_with_a_hanging_sigstore_times_out(
    snapshot: Snapshot, stub: str, tmp_path: Path
) -> None:
    opts = KeylessOptions(
        identity_token=_token(stub), trust_config=_trust_config(tmp_path, stub), timeout_s=1
    )
    t0 = time.monotonic()
    with pytest.raises(SigstoreUnavailableError, match="did not answer in time"):
        _sign_keyless(snapshot, opts)
    assert time.monotonic() - t0 < 10
    assert not snapshot.sig.exists()


def test_keyless_with_no_network_fails_fast(snapshot: Snapshot, tmp_path: Path) -> None:
    closed = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused
    opts = KeylessOptions(
        identity_token=_token(closed), trust_config=_trust_config(tmp_path, closed), timeout_s=20
    )
    t0 = time.monotonic()
    with pytest.raises(SigstoreUnavailableError, match="cannot reach Sigstore"):
        _sign_keyless(snapshot, opts)
    assert time.monotonic() - t0 < 10


def test_keyless_verification_needs_a_keyless_signature(
    snapshot: Snapshot, keys: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    _sign(snapshot, keys["a"])
    who = KeylessIdentity(
        identity="ci@example.com",
        oidc_issuer="https://token.actions.githubusercontent.com",
        trust_config=_trust_config(tmp_path, "http://127.0.0.1:9"),
    )
    with pytest.raises(WeightsSignatureError) as e:
        verify_weights(snapshot.dir, signature_path=snapshot.sig, identity=who)
    assert e.value.reason in {"malformed", "invalid"}
