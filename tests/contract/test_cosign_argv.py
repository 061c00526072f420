"""Golden argv for every cosign call Gantry makes, error mapping, and the runner's plumbing.

The flags are pinned per cosign version (v1.13, v2.2, v2.6, v3.0) after reading cosign's
``cmd/cosign/cli/options`` at those tags. The runner is exercised against a stand-in
``cosign`` script that records what it was given. The last test runs the real cosign and is
the only one that skips: wherever cosign is installed, it checks the key format both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from gantry.adapters import cosign as c
from gantry.adapters.cosign import CosignVersion, RegistryAccess, SigningKey
from gantry.errors import (
    CosignFailedError,
    CosignNetworkError,
    SignatureVerificationError,
    SigningConfigError,
    SigningKeyError,
    ToolNotFoundError,
    is_transient,
)
from gantry.signing import keys

pytestmark = pytest.mark.contract

V1 = CosignVersion(1, 13, 1)
V2 = CosignVersion(2, 2, 4)
V26 = CosignVersion(2, 6, 1)
V3 = CosignVersion(3, 0, 2)
IMG = "127.0.0.1:5000/gantry/minilm@sha256:" + "a" * 64
KEY = SigningKey("key", "/keys/cosign.key")
PUB = SigningKey("key", "/keys/cosign.pub")
KMS = SigningKey("kms", "awskms:///alias/gantry")
KEYLESS = SigningKey("keyless")
HTTP = RegistryAccess(plain_http=True)


# --- sign --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "version", "tlog", "registry", "legacy", "expected"),
    [
        (KEY, V2, False, HTTP, True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--allow-http-registry", IMG]),
        (KEY, V2, True, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", IMG]),
        (KMS, V2, False, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "awskms:///alias/gantry", "--tlog-upload=false",
          IMG]),
        (KMS, V2, True, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "awskms:///alias/gantry", IMG]),
        (KEYLESS, V2, True, RegistryAccess(), True, ["cosign", "sign", "--yes", IMG]),
        # v2.6 has --new-bundle-format/--use-signing-config, but both default to false.
        (KEY, V26, False, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false", IMG]),
        (KEY, V3, False, HTTP, True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--new-bundle-format=false", "--use-signing-config=false", "--allow-http-registry",
          IMG]),
        (KEY, V3, True, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--new-bundle-format=false",
          "--use-signing-config=false", IMG]),
        (KMS, V3, False, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--key", "awskms:///alias/gantry", "--tlog-upload=false",
          "--new-bundle-format=false", "--use-signing-config=false", IMG]),
        (KEYLESS, V3, True, RegistryAccess(), True,
         ["cosign", "sign", "--yes", "--new-bundle-format=false", "--use-signing-config=false",
          IMG]),
        # v3 writing Sigstore bundles: only the signing config has to go when the tlog is off.
        (KEY, V3, False, RegistryAccess(), False,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--use-signing-config=false", IMG]),
        (KEY, V3, True, RegistryAccess(), False,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", IMG]),
        # cosign v1 has no --allow-http-registry.
        (KEY, V1, False, HTTP, True,
         ["cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--allow-insecure-registry", IMG]),
    ],
)  # fmt: skip
def test_sign_argv(
    key: SigningKey,
    version: CosignVersion,
    tlog: bool,
    registry: RegistryAccess,
    legacy: bool,
    expected: list[str],
) -> None:
    argv = c.sign_argv(
        "cosign",
        IMG,
        key=key,
        version=version,
        tlog_upload=tlog,
        registry=registry,
        legacy_layout=legacy,
    )
    assert argv == expected


def test_sign_argv_annotations_and_tls() -> None:
    argv = c.sign_argv(
        "cosign",
        IMG,
        key=KEY,
        version=V2,
        tlog_upload=False,
        registry=RegistryAccess(skip_tls_verify=True),
        annotations={"b": "2", "a": "1"},
    )
    assert argv == [
        "cosign", "sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
        "--allow-insecure-registry", "-a", "a=1", "-a", "b=2", IMG,
    ]  # fmt: skip


def test_sign_refuses_a_tag() -> None:
    with pytest.raises(SigningConfigError, match="not pinned by digest"):
        c.sign_argv("cosign", "r/x:latest", key=KEY, version=V2, tlog_upload=False)


def test_signing_key_shapes() -> None:
    with pytest.raises(SigningConfigError, match="needs a key path or KMS URI"):
        SigningKey("key")
    with pytest.raises(SigningConfigError, match="takes no key"):
        SigningKey("keyless", "x")


# --- attest ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "version", "tlog", "ptype", "replace", "expected"),
    [
        (KEY, V2, False, "cyclonedx", False,
         ["cosign", "attest", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--type", "cyclonedx", "--predicate", "/tmp/p.json", "--allow-http-registry", IMG]),
        (KEY, V3, False, "https://gantry.ai/attestations/scan-summary/v1", True,
         ["cosign", "attest", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
          "--new-bundle-format=false", "--use-signing-config=false", "--type",
          "https://gantry.ai/attestations/scan-summary/v1", "--predicate", "/tmp/p.json",
          "--replace", "--allow-http-registry", IMG]),
        (KMS, V2, True, "cyclonedx", False,
         ["cosign", "attest", "--yes", "--key", "awskms:///alias/gantry", "--type", "cyclonedx",
          "--predicate", "/tmp/p.json", "--allow-http-registry", IMG]),
        (KEYLESS, V3, True, "cyclonedx", False,
         ["cosign", "attest", "--yes", "--new-bundle-format=false",
          "--use-signing-config=false", "--type", "cyclonedx", "--predicate", "/tmp/p.json",
          "--allow-http-registry", IMG]),
    ],
)  # fmt: skip
def test_attest_argv(
    key: SigningKey,
    version: CosignVersion,
    tlog: bool,
    ptype: str,
    replace: bool,
    expected: list[str],
) -> None:
    argv = c.attest_argv(
        "cosign",
        IMG,
        key=key,
        version=version,
        tlog_upload=tlog,
        predicate_path=Path("/tmp/p.json"),
        predicate_type=ptype,
        registry=HTTP,
        replace=replace,
    )
    assert argv == expected


# --- verify ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "version", "tlog", "identity", "expected"),
    [
        (PUB, V2, False, {},
         ["cosign", "verify", "--key", "/keys/cosign.pub", "--insecure-ignore-tlog=true",
          "--output", "json", "--allow-http-registry", IMG]),
        (PUB, V3, True, {},
         ["cosign", "verify", "--key", "/keys/cosign.pub", "--output", "json",
          "--allow-http-registry", IMG]),
        (KMS, V2, False, {},
         ["cosign", "verify", "--key", "awskms:///alias/gantry", "--insecure-ignore-tlog=true",
          "--output", "json", "--allow-http-registry", IMG]),
        (KEYLESS, V3, True,
         {"certificate_identity": "ci@example.com",
          "certificate_oidc_issuer": "https://token.example.com"},
         ["cosign", "verify", "--certificate-identity", "ci@example.com",
          "--certificate-oidc-issuer", "https://token.example.com", "--output", "json",
          "--allow-http-registry", IMG]),
    ],
)  # fmt: skip
def test_verify_argv(
    key: SigningKey,
    version: CosignVersion,
    tlog: bool,
    identity: dict[str, str],
    expected: list[str],
) -> None:
    argv = c.verify_argv(
        "cosign", IMG, key=key, version=version, tlog=tlog, registry=HTTP, **identity
    )
    assert argv == expected


def test_verify_keyless_needs_identity() -> None:
    with pytest.raises(SigningConfigError, match="certificate identity and OIDC issuer"):
        c.verify_argv("cosign", IMG, key=KEYLESS, version=V2, tlog=True)


@pytest.mark.parametrize(
    ("tlog", "expected"),
    [
        (False,
         ["cosign", "verify-attestation", "--key", "/keys/cosign.pub", "--type", "cyclonedx",
          "--insecure-ignore-tlog=true", "--allow-http-registry", IMG]),
        (True,
         ["cosign", "verify-attestation", "--key", "/keys/cosign.pub", "--type", "cyclonedx",
          "--allow-http-registry", IMG]),
    ],
)  # fmt: skip
def test_verify_attestation_argv(tlog: bool, expected: list[str]) -> None:
    argv = c.verify_attestation_argv(
        "cosign", IMG, key=PUB, version=V2, predicate_type="cyclonedx", tlog=tlog, registry=HTTP
    )
    assert argv == expected


def test_key_and_version_argv() -> None:
    assert c.generate_key_pair_argv("cosign") == [
        "cosign", "generate-key-pair", "--output-key-prefix", "cosign",
    ]  # fmt: skip
    assert c.generate_key_pair_argv("cosign", prefix="release", kms="gcpkms://k") == [
        "cosign", "generate-key-pair", "--kms", "gcpkms://k", "--output-key-prefix", "release",
    ]  # fmt: skip
    assert c.public_key_argv("cosign", "/keys/cosign.key") == [
        "cosign", "public-key", "--key", "/keys/cosign.key",
    ]  # fmt: skip
    assert c.version_argv("cosign") == ["cosign", "version", "--json"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"gitVersion": "v2.2.4", "gitCommit": "fb651b4"}', V2),
        ("  ______   ______.\nGitVersion:    v3.0.2\nGitCommit: x\n", V3),
        ("v1.13.1", V1),
    ],
)
def test_version_parse(text: str, expected: CosignVersion) -> None:
    assert CosignVersion.parse(text) == expected


# --- error mapping -----------------------------------------------------------------------
# The stderr texts are built from the messages in cosign's source (pkg/cosign/verify.go,
# go-securesystemslib's "decryption failed", Go's net errors), not recorded from a real run.

_DIAL = "dial tcp 127.0.0.1:5000: connect: connection refused"


@pytest.mark.parametrize(
    ("stderr", "image", "error"),
    [
        ("Error: signing [x]: getting signer: reading key: decrypt: encrypted: decryption failed"
         "\nmain.go:74: error during command execution", None, SigningKeyError),
        ("Error: signing [x]: reading key: open /k/cosign.key: no such file or directory",
         None, SigningKeyError),
        (f"Error: GET http://127.0.0.1:5000/v2/: {_DIAL}", None, CosignNetworkError),
        ("Error: PUT http://r/v2/x/manifests/sha256-1.sig: unexpected status code 503 "
         "Service Unavailable", None, CosignNetworkError),
        ("Error: no matching signatures: invalid signature when validating ASN.1 encoded "
         "signature", IMG, SignatureVerificationError),
        ("Error: no signatures found", IMG, SignatureVerificationError),
        ("Error: none of the attestations matched the predicate type: cyclonedx, found: "
         "https://x", IMG, SignatureVerificationError),
        ("Error: unknown flag: --new-bundle-format", None, CosignFailedError),
    ],
)  # fmt: skip
def test_error_mapping(stderr: str, image: str | None, error: type[Exception]) -> None:
    exc = c.error_for(["cosign", "x"], 1, stderr, image=image)
    assert type(exc) is error
    assert is_transient(exc) == (error is CosignNetworkError)


# --- the runner, against a stand-in cosign -----------------------------------------------

FAKE = """\
import json, os, sys
rec = os.environ["FAKE_COSIGN_RECORD"]
calls = json.load(open(rec)) if os.path.exists(rec) else []
calls.append({"argv": sys.argv[1:], "password": os.environ.get("COSIGN_PASSWORD"),
              "token": os.environ.get("SIGSTORE_ID_TOKEN"), "cwd": os.getcwd()})
json.dump(calls, open(rec, "w"))
cmd = sys.argv[1]
if cmd == "version":
    print(json.dumps({"gitVersion": os.environ.get("FAKE_COSIGN_VERSION", "v2.2.4")}))
elif os.environ.get("FAKE_COSIGN_FAIL"):
    pw = str(os.environ.get("COSIGN_PASSWORD"))
    sys.stderr.write(os.environ["FAKE_COSIGN_FAIL"] + " password=" + pw)
    sys.exit(1)
elif cmd == "verify":
    sys.stderr.write("Verification for x --\\n")
    print(json.dumps([{"critical": {"identity": {"docker-reference": "r/x"}, "image":
          {"docker-manifest-digest": "sha256:1"}, "type": "cosign container image signature"},
          "optional": None}]))
elif cmd == "verify-attestation":
    import base64
    st = {"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://cyclonedx.org/bom",
          "subject": [], "predicate": {}}
    print(json.dumps({"payloadType": "application/vnd.in-toto+json",
                      "payload": base64.b64encode(json.dumps(st).encode()).decode(),
                      "signatures": []}))
elif cmd == "generate-key-pair":
    open("cosign.key", "w").write("k"); open("cosign.pub", "w").write("p")
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    binary = tmp_path / "bin" / "cosign"
    binary.parent.mkdir()
    binary.write_text(f"#!{sys.executable}\n{FAKE}")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "calls.json"
    monkeypatch.setenv("FAKE_COSIGN_RECORD", str(record))
    return binary, record


def _calls(record: Path) -> list[dict[str, object]]:
    return list(json.loads(record.read_text()))


def test_runner_passes_the_password_in_the_environment_only(fake: tuple[Path, Path]) -> None:
    binary, record = fake
    runner = c.Cosign(binary, registry=HTTP)
    runner.sign(IMG, key=KEY, password="hunter2-pass", tlog_upload=False)
    calls = _calls(record)
    assert [x["argv"] for x in calls] == [
        ["version", "--json"],
        ["sign", "--yes", "--key", "/keys/cosign.key", "--tlog-upload=false",
         "--allow-http-registry", IMG],
    ]  # fmt: skip
    assert calls[1]["password"] == "hunter2-pass"
    assert all("hunter2-pass" not in json.dumps(x["argv"]) for x in calls)


def test_runner_uses_v3_flags_when_cosign_is_v3(
    fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, record = fake
    monkeypatch.setenv("FAKE_COSIGN_VERSION", "v3.0.2")
    c.Cosign(binary).attest(
        IMG, key=KEY, password="", tlog_upload=False, predicate=b"{}", predicate_type="cyclonedx"
    )
    argv = _calls(record)[-1]["argv"]
    assert isinstance(argv, list)
    assert "--new-bundle-format=false" in argv and "--use-signing-config=false" in argv
    predicate = argv[argv.index("--predicate") + 1]
    assert not Path(predicate).exists()  # the temporary predicate file is gone


def test_runner_keyless_token_in_the_environment(fake: tuple[Path, Path]) -> None:
    binary, record = fake
    c.Cosign(binary, version=V2).sign(
        IMG, key=KEYLESS, password=None, tlog_upload=True, identity_token="eyJ.tok.en"
    )
    call = _calls(record)[-1]
    assert call["token"] == "eyJ.tok.en" and call["password"] is None
    assert call["argv"] == ["sign", "--yes", IMG]


def test_runner_failure_is_mapped_and_redacted(
    fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, _ = fake
    monkeypatch.setenv(
        "FAKE_COSIGN_FAIL", "Error: reading key: decrypt: encrypted: decryption failed"
    )
    with pytest.raises(SigningKeyError, match="wrong password") as exc:
        c.Cosign(binary, version=V2).sign(IMG, key=KEY, password="hunter2-pass", tlog_upload=False)
    assert "hunter2-pass" not in str(exc.value)
    monkeypatch.setenv("FAKE_COSIGN_FAIL", f"Error: {_DIAL}")
    with pytest.raises(CosignNetworkError) as net:
        c.Cosign(binary, version=V2).sign(IMG, key=KEY, password="hunter2-pass", tlog_upload=False)
    assert "hunter2-pass" not in str(net.value) and is_transient(net.value)


def test_runner_parses_verify_outputs(fake: tuple[Path, Path]) -> None:
    binary, _ = fake
    runner = c.Cosign(binary, version=V2)
    payloads = runner.verify(IMG, key=PUB, tlog=False)
    assert payloads[0]["critical"]["type"] == "cosign container image signature"
    statements = runner.verify_attestation(IMG, key=PUB, predicate_type="cyclonedx", tlog=False)
    assert statements[0]["predicateType"] == "https://cyclonedx.org/bom"


def test_runner_generate_key_pair_runs_in_the_target_dir(
    fake: tuple[Path, Path], tmp_path: Path
) -> None:
    binary, record = fake
    dest = tmp_path / "k"
    priv, pub = c.Cosign(binary, version=V2).generate_key_pair(dest, "pw-1234")
    assert priv.read_text() == "k" and pub.read_text() == "p"
    call = _calls(record)[-1]
    assert call["cwd"] == str(dest) and call["password"] == "pw-1234"
    with pytest.raises(SigningKeyError, match="already exists"):
        c.Cosign(binary, version=V2).generate_key_pair(dest, "pw-1234")


def test_find_honours_cosign_bin(fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    binary, _ = fake
    monkeypatch.setenv("COSIGN_BIN", str(binary))
    assert c.Cosign.available()
    assert c.Cosign.find().binary == str(binary)
    monkeypatch.setenv("COSIGN_BIN", str(binary.parent / "nope"))
    with pytest.raises(ToolNotFoundError, match="COSIGN_BIN"):
        c.Cosign.find()


def test_parse_verify_output_tolerates_leading_text() -> None:
    out = 'Verification for x --\n[{"critical": {}, "optional": null}]\n'
    assert c.parse_verify_output(out) == [{"critical": {}, "optional": None}]
    with pytest.raises(CosignFailedError, match="no JSON"):
        c.parse_verify_output("nothing")


# --- the real cosign ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cosign") is None, reason="cosign is not installed here")
def test_real_cosign_reads_and_writes_gantry_keys(tmp_path: Path) -> None:
    """Cross-check of the key format with the real binary, both directions."""
    runner = c.Cosign.find()
    # cosign → Gantry
    priv, pub = runner.generate_key_pair(tmp_path / "by-cosign", "pw-cosign")
    key = keys.load_private_key(priv, "pw-cosign")
    assert keys.key_id(key) == keys.fingerprint_pem(pub.read_bytes())
    # Gantry → cosign
    gpriv, gpub = keys.generate_keypair(tmp_path / "by-gantry", "pw-gantry")
    pem = runner.public_key(str(gpriv), password="pw-gantry")
    assert keys.fingerprint_pem(pem) == keys.fingerprint_pem(gpub.read_bytes())
    with pytest.raises(SigningKeyError):
        runner.public_key(str(gpriv), password="not-it")
    assert os.stat(priv).st_mode & 0o077 == 0
