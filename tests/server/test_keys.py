"""Signing keys: generated once with mode 0600, reloaded with the same kid, rotation-ready."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.keys import key_id, load_or_create_keys


def test_missing_key_is_generated_private_and_reloaded(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "signing.pem"

    first = load_or_create_keys(key_file)
    second = load_or_create_keys(key_file)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.active.kid == second.active.kid
    assert first.active.kid == key_id(first.active.public_key)
    assert list(first.public_keys()) == [first.active.kid]


def test_other_pem_files_are_kept_as_retired_verification_keys(tmp_path: Path) -> None:
    old = Ed25519PrivateKey.generate()
    (tmp_path / "old.pem").write_bytes(
        old.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    ring = load_or_create_keys(tmp_path / "signing.pem")

    assert [k.kid for k in ring.retired] == [key_id(old.public_key())]
    assert set(ring.public_keys()) == {ring.active.kid, key_id(old.public_key())}


def test_a_file_that_is_not_an_ed25519_key_fails_clearly(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.pem"
    key_file.write_text("not a key")

    with pytest.raises(ValueError, match=r"."):
        load_or_create_keys(key_file)
