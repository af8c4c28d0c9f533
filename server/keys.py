"""The service's Ed25519 signing keys: loaded from PEM files, generated on first start.

The active key is ``settings.key_file``; every other ``*.pem`` in the same directory is kept
as a verification-only key, so codes signed before a rotation stay valid for their minute.
A key's ``kid`` is a short hash of its public key (stable, safe for codes and topics).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KeyRing", "SigningKey", "key_id", "load_or_create_keys"]


def key_id(public_key: Ed25519PublicKey) -> str:
    """``k`` + 11 characters of base64url(sha256(raw public key))."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashlib.sha256(raw).digest()[:8]
    return "k" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The key that signs new codes plus every key whose codes are still accepted."""

    active: SigningKey
    retired: tuple[SigningKey, ...] = ()

    @property
    def all(self) -> tuple[SigningKey, ...]:
        return (self.active, *self.retired)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {key.kid: key.public_key for key in self.all}


def _load(path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return SigningKey(kid=key_id(key.public_key()), private_key=key)


def _create(path: Path) -> SigningKey:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: two processes starting at once never overwrite each other's key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return SigningKey(kid=key_id(key.public_key()), private_key=key)


def load_or_create_keys(key_file: Path) -> KeyRing:
    """Load the active key (creating it with mode 0600 when missing) and retired keys."""
    try:
        active = _load(key_file) if key_file.exists() else _create(key_file)
    except FileExistsError:  # created concurrently by another process
        active = _load(key_file)
    retired = tuple(
        _load(other)
        for other in sorted(key_file.parent.glob("*.pem"))
        if other.resolve() != key_file.resolve()
    )
    return KeyRing(active=active, retired=tuple(k for k in retired if k.kid != active.kid))
