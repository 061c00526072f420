"""Where the signing keys live, and the embedded default key pairs.

The embedded default (no ``sign.key`` in the spec) uses key pairs under
``<state dir>/keys/``, generated on first use, so a fresh machine can sign and verify
without setup. Production sets ``sign.key`` (or ``sign.method: kms``) to its own keys;
a configured key that is missing is an error, never silently replaced.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gantry.errors import ConfigError
from gantry.settings import Settings
from gantry.spec import SignOptions

log = logging.getLogger("gantry.sign")


class KeyPaths(BaseModel):
    """The private and public keys for the image and for the weights."""

    model_config = ConfigDict(frozen=True)

    image_key: str
    image_pub: str
    weights_key: str
    weights_pub: str
    generated: bool = False


def keys_dir(settings: Settings) -> Path:
    return settings.state_dir / "keys"


def password(options: SignOptions) -> str:
    """The key password from the variable the spec names ('' when unset, as cosign)."""
    return os.environ.get(options.password_env, "")


def public_key_for(private_key: Path) -> Path:
    """cosign's convention: `x.key` pairs with `x.pub` beside it."""
    return private_key.with_suffix(".pub")


def resolve_keys(options: SignOptions, settings: Settings) -> KeyPaths:
    """The key pairs to sign with; the embedded default pairs are created when missing."""
    from gantry.adapters.model_signing import generate_weights_key
    from gantry.signing.image import generate_keypair

    kdir = keys_dir(settings)
    generated = False
    if options.key:
        image_key = Path(options.key).expanduser()
        if not image_key.is_file():
            raise ConfigError(
                f"signing key {image_key} (sign.key) does not exist",
                fix=f"create one with `gantry keys generate --dir {image_key.parent}` or fix "
                "sign.key",
            )
        image_pub = public_key_for(image_key)
        weights_key = image_key.with_name("weights.key")
    else:
        image_key, image_pub = kdir / "cosign.key", kdir / "cosign.pub"
        weights_key = kdir / "weights.key"
        if not image_key.is_file() and settings.topology == "multi":
            # A key made here would be this host's alone: the next host to run the release
            # would sign it again with another, and verify nothing this one signed.
            raise ConfigError(
                "GANTRY_TOPOLOGY=multi: every worker host must sign with the same key, and "
                f"there is none under {kdir} to use",
                fix="set sign.key to a key pair every worker has at that path (`gantry keys "
                "generate --dir DIR` once, then mount DIR from a secret), or sign.method: kms",
            )
        if not image_key.is_file():
            kdir.mkdir(parents=True, exist_ok=True)
            generate_keypair(kdir, password(options))
            generated = True
            log.warning(
                "generated the default image signing key pair in %s%s; production should set "
                "sign.key or sign.method: kms",
                kdir,
                "" if password(options) else f" WITHOUT a password (${options.password_env} unset)",
            )
    weights_pub = public_key_for(weights_key)
    if not weights_key.is_file():
        if options.key:
            raise ConfigError(
                f"weights signing key {weights_key} does not exist (it is expected beside "
                "sign.key)",
                fix=f"create it with `gantry keys generate --dir {weights_key.parent}`",
            )
        generate_weights_key(kdir, password(options) or None)
        generated = True
    for p in (image_pub, weights_pub):
        if not p.is_file():
            raise ConfigError(f"public key {p} is missing", fix="restore it beside its private key")
    return KeyPaths(
        image_key=str(image_key),
        image_pub=str(image_pub),
        weights_key=str(weights_key),
        weights_pub=str(weights_pub),
        generated=generated,
    )
