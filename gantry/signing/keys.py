"""Cosign's key files: an ECDSA P-256 key pair, the private half sealed with a password.

The format, as written by cosign (``pkg/cosign/keys.go``) through go-securesystemslib
(``encrypted/encrypted.go``):

* private key: a PEM block ``ENCRYPTED SIGSTORE PRIVATE KEY`` (cosign before 2.x wrote
  ``ENCRYPTED COSIGN PRIVATE KEY``; both are read) whose body is the JSON
  ``{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":B64},
  "cipher":{"name":"nacl/secretbox","nonce":B64},"ciphertext":B64}``. The 32-byte box key
  is scrypt(password, salt 32 bytes, N, r, p); the ciphertext is NaCl secretbox
  (XSalsa20-Poly1305, 24-byte nonce) of the PKCS#8 DER private key. Base64 is standard
  with padding (Go's encoding of ``[]byte``). Only the three parameter sets go-securesystemslib
  accepts are read (N = 2^15, 2^16, 2^17 with r=8, p=1), which also bounds the work an
  attacker-supplied file can ask for.
* public key: a ``PUBLIC KEY`` PEM block (SubjectPublicKeyInfo DER).
* the private key file is mode 0600, the public one 0644; an empty password is allowed.

Decryption is checked against Go-produced vectors in ``tests/data/cosign``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from gantry.errors import SigningKeyError

SIGSTORE_PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_PEM_TYPE = "ENCRYPTED COSIGN PRIVATE KEY"
PUBLIC_PEM_TYPE = "PUBLIC KEY"
PRIVATE_PEM_TYPES = (SIGSTORE_PEM_TYPE, COSIGN_PEM_TYPE)

#: go-securesystemslib's parameter sets (Legacy, Standard = cosign's default, OWASP).
SCRYPT_PARAMS = {
    "legacy": (32768, 8, 1),
    "standard": (65536, 8, 1),
    "owasp": (131072, 8, 1),
}
_SALT_SIZE = 32
_KEY_SIZE = 32

#: The variable cosign reads the key password from.
DEFAULT_PASSWORD_ENV = "COSIGN_PASSWORD"  # noqa: S105  (a variable name, not a password)
#: The command that makes a key pair, named in every "missing key" message.
GENERATE_HINT = "create a key pair with `gantry keys generate`"

_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)\r?\n?-----END \1-----", re.DOTALL)


def password_fix(password_env: str = DEFAULT_PASSWORD_ENV) -> str:
    return (
        f"set ${password_env} to the password the key was created with "
        "(an empty value for a key without password)"
    )


# --- PEM ---------------------------------------------------------------------------------


def pem_encode(pem_type: str, der: bytes) -> bytes:
    """A PEM block with 64-column base64 lines, as Go's ``pem.EncodeToMemory`` writes it."""
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        f"-----BEGIN {pem_type}-----\n" + "\n".join(lines) + f"\n-----END {pem_type}-----\n"
    ).encode()


def pem_decode(data: bytes) -> tuple[str, bytes] | None:
    """Type and body of the first PEM block in ``data`` (None when there is none)."""
    m = _PEM.search(data.decode("ascii", errors="replace"))
    if m is None:
        return None
    try:
        return m[1], base64.b64decode("".join(m[2].split()), validate=True)
    except binascii.Error:
        return None


# --- the sealed box ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal(plaintext: bytes, password: bytes, *, strength: str = "standard") -> bytes:
    """go-securesystemslib's ``encrypted.Encrypt``: scrypt + secretbox, as compact JSON."""
    n, r, p = SCRYPT_PARAMS[strength]
    salt = secrets.token_bytes(_SALT_SIZE)
    key = Scrypt(salt=salt, length=_KEY_SIZE, n=n, r=r, p=p).derive(password)
    nonce = secrets.token_bytes(nacl.secret.SecretBox.NONCE_SIZE)
    ciphertext = nacl.secret.SecretBox(key).encrypt(plaintext, nonce).ciphertext
    # Field order and compact separators follow Go's json.Marshal of the same structs.
    doc = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": r, "p": p}, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(ciphertext),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def unseal(
    sealed: bytes, password: bytes, *, source: str, password_env: str = DEFAULT_PASSWORD_ENV
) -> bytes:
    """go-securesystemslib's ``encrypted.Decrypt``; SigningKeyError on any failure."""

    def bad(why: str) -> SigningKeyError:
        return SigningKeyError(
            f"{source} is not a cosign encrypted private key: {why}", fix=GENERATE_HINT
        )

    try:
        doc: Any = json.loads(sealed)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf["name"] != "scrypt":
            raise bad(f"unknown kdf {kdf['name']!r}")
        if cipher["name"] != "nacl/secretbox":
            raise bad(f"unknown cipher {cipher['name']!r}")
        params = (int(kdf["params"]["N"]), int(kdf["params"]["r"]), int(kdf["params"]["p"]))
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise bad(f"malformed ({type(exc).__name__}: {exc})") from None
    if params not in SCRYPT_PARAMS.values():
        raise bad(f"unsupported scrypt parameters N={params[0]} r={params[1]} p={params[2]}")
    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise bad("nonce is not 24 bytes")
    key = Scrypt(salt=salt, length=_KEY_SIZE, n=params[0], r=params[1], p=params[2]).derive(
        password
    )
    try:
        return nacl.secret.SecretBox(key).decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        # secretbox authenticates: a wrong password and an altered file look the same.
        raise SigningKeyError(
            f"wrong password for {source} (or the key file was altered)",
            fix=password_fix(password_env),
        ) from None


# --- keys --------------------------------------------------------------------------------


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, cosign's default."""
    return ec.generate_private_key(ec.SECP256R1())


def encrypt_private_key(
    key: ec.EllipticCurvePrivateKey, password: str, *, pem_type: str = SIGSTORE_PEM_TYPE
) -> bytes:
    """The private key file's content: PKCS#8 DER sealed with ``password``, as PEM."""
    if pem_type not in PRIVATE_PEM_TYPES:
        raise ValueError(f"pem_type must be one of {PRIVATE_PEM_TYPES}")
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem_encode(pem_type, seal(der, password.encode()))


def decrypt_private_key(
    pem: bytes,
    password: str,
    *,
    source: str = "the private key",
    password_env: str = DEFAULT_PASSWORD_ENV,
) -> ec.EllipticCurvePrivateKey:
    """Open a cosign private key file's content with ``password``."""
    block = pem_decode(pem)
    if block is None:
        raise SigningKeyError(f"{source} holds no PEM block", fix=GENERATE_HINT)
    pem_type, body = block
    if pem_type not in PRIVATE_PEM_TYPES:
        raise SigningKeyError(
            f"{source} is a {pem_type!r} PEM block, not a cosign private key "
            f"({SIGSTORE_PEM_TYPE!r} or {COSIGN_PEM_TYPE!r})",
            fix="import it with `cosign import-key-pair`, or " + GENERATE_HINT,
        )
    der = unseal(body, password.encode(), source=source, password_env=password_env)
    return _ecdsa_p256(der, source)


def _ecdsa_p256(pkcs8_der: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    # cosign parses the sealed bytes with x509.ParsePKCS8PrivateKey only: a SEC1 "EC PRIVATE
    # KEY" sealed inside is an error there, so it is one here too.
    if not _looks_pkcs8(pkcs8_der):
        raise SigningKeyError(f"{source} does not seal a PKCS#8 private key", fix=GENERATE_HINT)
    try:
        key = serialization.load_der_private_key(pkcs8_der, password=None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"{source} seals an unreadable key: {exc}", fix=GENERATE_HINT
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(
            f"{source} is a {type(key).__name__} key; the built-in signer handles ECDSA P-256 "
            "keys only",
            fix="use `sign.signer: cosign` for other key types, or " + GENERATE_HINT,
        )
    return key


def _looks_pkcs8(der: bytes) -> bool:
    """PrivateKeyInfo is SEQUENCE { INTEGER version, SEQUENCE algorithm, … }; SEC1's
    ECPrivateKey has an OCTET STRING where PKCS#8 has the algorithm SEQUENCE."""
    if len(der) < 8 or der[0] != 0x30:
        return False
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    if der[i] != 0x02:  # version INTEGER
        return False
    i += 2 + der[i + 1]
    return i < len(der) and der[i] == 0x30


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem_encode(PUBLIC_PEM_TYPE, der)


def parse_public_key(pem: bytes, *, source: str = "the public key") -> ec.EllipticCurvePublicKey:
    block = pem_decode(pem)
    if block is None or block[0] != PUBLIC_PEM_TYPE:
        raise SigningKeyError(f"{source} holds no PUBLIC KEY PEM block", fix=GENERATE_HINT)
    try:
        key = serialization.load_der_public_key(block[1])
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{source} is unreadable: {exc}", fix=GENERATE_HINT) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(
            f"{source} is not an ECDSA P-256 public key; the built-in verifier handles only those",
            fix="verify with `sign.signer: cosign`",
        )
    return key


def key_id(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """Fingerprint of a key: sha256 of its public key's SubjectPublicKeyInfo DER, in hex."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes, *, source: str = "the public key") -> str:
    """:func:`key_id` of a PEM public key of any type (cosign keys need not be P-256)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"{source} is not a PEM public key: {exc}", fix=GENERATE_HINT
        ) from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# --- files -------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{what} {path} does not exist", fix=GENERATE_HINT) from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_private_key(
    path: Path, password: str, *, password_env: str = DEFAULT_PASSWORD_ENV
) -> ec.EllipticCurvePrivateKey:
    """Read and decrypt a cosign private key file."""
    return decrypt_private_key(
        _read(path, "private key"), password, source=str(path), password_env=password_env
    )


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    return parse_public_key(_read(path, "public key"), source=str(path))


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``path`` with ``mode`` from the first byte (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.chmod(mode)  # the umask may have narrowed it; make it exactly `mode`
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails when `path` exists: no window in which a key is overwritten.
            os.link(tmp, path)
    except FileExistsError:
        raise SigningKeyError(
            f"{path} already exists; Gantry does not overwrite keys",
            fix="remove it first, or write the new pair to another directory",
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def generate_keypair(
    dest_dir: Path, password: str, *, prefix: str = "cosign", overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``<prefix>.key`` (0600) and ``<prefix>.pub`` (0644) into ``dest_dir``."""
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = dest_dir / f"{prefix}.key", dest_dir / f"{prefix}.pub"
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise SigningKeyError(
                    f"{p} already exists; Gantry does not overwrite keys",
                    fix="remove it first, or write the new pair to another directory",
                )
    key = generate_private_key()
    _write_new(priv_path, encrypt_private_key(key, password), 0o600, overwrite)
    _write_new(pub_path, public_key_pem(key.public_key()), 0o644, overwrite)
    return priv_path, pub_path
