"""Gantry's image signatures against an independent implementation: sigstore-rs, the
Sigstore project's Rust library (tests/interop/sigstore-rs, built with cargo; the build is
kept in ~/.cache/gantry/sigstore-peer, so only the first `make test` on a machine compiles
it, ~2 min on 2 cores).

Both directions, on the real registry: what Gantry's built-in signer writes, sigstore-rs
verifies (and refuses once tampered with); what sigstore-rs signs, Gantry verifies (and
refuses with another key); each side's key files are read by the other. sigstore-rs does
not read `.att` attestations, so those are not covered here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from gantry.adapters import docker_engine
from gantry.adapters.registry import RegistryClient
from gantry.errors import SignatureVerificationError
from gantry.signing import image as signing
from gantry.signing import simple
from gantry.spec import SignOptions
from tests.integration.test_image_signing import _build
from tests.integration.test_image_signing import client as client
from tests.support import REPO_ROOT, GantryEnv

pytestmark = pytest.mark.integration

PEER = REPO_ROOT / "tests" / "interop" / "sigstore-rs"
#: Outside the checkout, so that every clone (CI's included) finds the build; cargo rebuilds
#: only what changed (its fingerprints key on the sources and the lock file).
TARGET = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gantry" / "sigstore-peer"
)
PASSWORD = "interop pass phrase"
PASSWORD_ENV = "GANTRY_TEST_PEER_PASSWORD"
BUILTIN = SignOptions(signer="builtin", password_env=PASSWORD_ENV)


@pytest.fixture(scope="module")
def peer() -> Path:
    """The sigstore-rs peer binary, built once (cargo's target dir under the cache dir)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail(
            "cargo is not installed: the sigstore-rs interop tests need it "
            "(Debian: `apt-get install cargo`, or rustup from https://rustup.rs)"
        )
    done = subprocess.run(
        [cargo, "build", "--release", "--locked", "--manifest-path", str(PEER / "Cargo.toml")],
        env={**os.environ, "CARGO_TARGET_DIR": str(TARGET)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return TARGET / "release" / "sigstore-peer"


@dataclass
class Repo:
    registry: str
    repository: str
    name: str  # <registry>/<repository>
    digests: dict[str, str]


@pytest.fixture(scope="module")
def repo(gantry_env: GantryEnv, client: docker.DockerClient) -> Iterator[Repo]:
    """Three tiny images of one repository, pushed as :a, :b and :c."""
    repository = f"gantry-test/interop-{secrets.token_hex(4)}"
    name = f"{gantry_env.registry}/{repository}"
    built, digests = [], {}
    try:
        for tag in ("a", "b", "c"):
            built.append(_build(client, f"{name}:{tag}", f"{tag}-{repository[-8:]}"))
            digests[tag] = docker_engine.push(client, name, tag, timeout_s=300)
        yield Repo(gantry_env.registry, repository, name, digests)
    finally:
        for image_id in built:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image_id, force=True)


def _peer(peer: Path, repo: Repo, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(peer), *args, "--plain-http", repo.registry],
        env={**os.environ, PASSWORD_ENV: PASSWORD},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _keys(tmp_path: Path, password: str) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path, password)


def _sign_builtin(image: str, key: Path, password: str = PASSWORD) -> None:
    options = BUILTIN.model_copy(update={"key": str(key)})
    signing.sign_image(image, options, key.parent, password_provider=lambda _o: password)


def test_a_builtin_signature_verifies_with_sigstore_rs_and_tampering_is_refused(
    peer: Path, repo: Repo, tmp_path: Path
) -> None:
    priv, pub = _keys(tmp_path / "gantry", PASSWORD)
    _other_priv, other_pub = _keys(tmp_path / "other", PASSWORD)
    image = f"{repo.name}@{repo.digests['a']}"
    _sign_builtin(image, priv)
    ok = _peer(peer, repo, "verify", "--key", str(pub), image)
    assert ok.returncode == 0, ok.stderr
    # Another key: refused.
    other = _peer(peer, repo, "verify", "--key", str(other_pub), image)
    assert other.returncode == 1 and "no signature" in other.stderr, other.stderr
    # The tag re-pointed to another image: its digest carries no signature.
    with RegistryClient(repo.registry) as reg:
        manifest = reg.get_manifest(repo.repository, repo.digests["b"])
        assert manifest is not None
        reg.put_manifest(repo.repository, "a", manifest.raw, manifest.media_type)
    repointed = _peer(peer, repo, "verify", "--key", str(pub), f"{repo.name}:a")
    assert repointed.returncode == 1, repointed.stderr
    # A corrupted signature (one byte of the base64 changed in the annotation): refused.
    tag = simple.signature_tag(repo.digests["a"])
    with RegistryClient(repo.registry) as reg:
        sig = reg.get_manifest(repo.repository, tag)
        assert sig is not None
        doc = sig.json()
        b64 = doc["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"]
        flipped = b64[:10] + ("A" if b64[10] != "A" else "B") + b64[11:]
        doc["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"] = flipped
        reg.put_manifest(repo.repository, tag, json.dumps(doc).encode(), sig.media_type)
    corrupted = _peer(peer, repo, "verify", "--key", str(pub), image)
    assert corrupted.returncode == 1, corrupted.stderr


def test_a_sigstore_rs_signature_passes_gantrys_verification(
    peer: Path, repo: Repo, tmp_path: Path
) -> None:
    priv, pub = _keys(tmp_path / "gantry", PASSWORD)
    _other_priv, other_pub = _keys(tmp_path / "other", PASSWORD)
    image = f"{repo.name}@{repo.digests['c']}"
    signed = _peer(peer, repo, "sign", "--key", str(priv), "--password-env", PASSWORD_ENV, image)
    assert signed.returncode == 0, signed.stderr
    verified = signing.verify_image(image, pub, options=BUILTIN)
    assert verified.digest == repo.digests["c"] and verified.payloads
    [payload] = verified.payloads
    assert payload["critical"]["image"]["docker-manifest-digest"] == repo.digests["c"]
    with pytest.raises(SignatureVerificationError):
        signing.verify_image(image, other_pub, options=BUILTIN)


@pytest.mark.parametrize("password", [PASSWORD, ""], ids=["with-password", "no-password"])
def test_key_files_are_read_both_ways(
    peer: Path, repo: Repo, tmp_path: Path, password: str
) -> None:
    """A key `gantry keys generate` writes signs with sigstore-rs; a key sigstore-rs writes
    signs with Gantry's built-in signer; each signature verifies on the other side."""
    env_password = {**os.environ, PASSWORD_ENV: password}
    priv, pub = _keys(tmp_path / "gantry", password)
    image = f"{repo.name}@{repo.digests['b']}"
    done = subprocess.run(
        [str(peer), "sign", "--key", str(priv), "--password-env", PASSWORD_ENV,
         "--plain-http", repo.registry, image],
        env=env_password, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert signing.verify_image(image, pub, options=BUILTIN).payloads

    made = tmp_path / "peer" / "cosign"
    made.parent.mkdir()
    done = subprocess.run(
        [str(peer), "generate-key", "--out", str(made), "--password-env", PASSWORD_ENV],
        env=env_password, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = made.with_suffix(".key")
    _sign_builtin(image, key, password)
    verified = _peer(peer, repo, "verify", "--key", str(made.with_suffix(".pub")), image)
    assert verified.returncode == 0, verified.stderr
