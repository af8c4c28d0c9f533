from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from parking_protocol.qr_token import (
    CodeRejected,
    issue_code,
    load_public_key,
    public_key_text,
    verify_code,
)
from parking_protocol.types import CodeRejection

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}


def rejection(code: str, now: datetime = NOW, keys: dict[str, object] | None = None) -> str:
    with pytest.raises(CodeRejected) as info:
        verify_code(code, keys or KEYS, now=now)  # type: ignore[arg-type]
    return info.value.reason.value


def test_fresh_code_verifies_and_names_the_account() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    claims = verify_code(code, KEYS, now=NOW + timedelta(seconds=30))
    assert claims.account_id == "alice"
    assert claims.expires_at - claims.issued_at == timedelta(seconds=60)


def test_code_fits_a_small_qr_code() -> None:
    code = issue_code(KEY, kid="k1", account_id="a" * 36, now=NOW)
    assert len(code) <= 180


def test_expired_code_is_refused_after_lifetime_plus_skew() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    verify_code(code, KEYS, now=NOW + timedelta(seconds=64))  # within 5 s skew
    assert rejection(code, NOW + timedelta(seconds=65)) == CodeRejection.EXPIRED


def test_code_from_the_future_is_refused() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW + timedelta(seconds=30))
    assert rejection(code) == CodeRejection.NOT_YET_VALID


def test_forged_signature_is_refused() -> None:
    forger = Ed25519PrivateKey.generate()
    code = issue_code(forger, kid="k1", account_id="alice", now=NOW)
    assert rejection(code) == CodeRejection.BAD_SIGNATURE


# The order of the Ed25519 group: S and S + L verify alike in a lax checker.
_ED25519_L = 2**252 + 27742317777372353535851937790883648493


def test_a_malleated_signature_is_refused() -> None:
    """The same signature with S + L (another encoding of the same scalar) must not make a
    second valid code out of one (a screenshot with its nonce re-spent)."""
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    body, _, sig_text = code.rpartition(".")
    signature = base64.urlsafe_b64decode(sig_text + "==")
    s = int.from_bytes(signature[32:], "little") + _ED25519_L
    malleated = signature[:32] + s.to_bytes(32, "little")
    forged = f"{body}.{base64.urlsafe_b64encode(malleated).rstrip(b'=').decode()}"
    assert forged != code
    assert rejection(forged) == CodeRejection.BAD_SIGNATURE


def test_codes_of_many_keys_verify_and_cross_keys_are_refused() -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(20)]
    for i, key in enumerate(keys):
        code = issue_code(key, kid="k1", account_id="alice", now=NOW)
        assert verify_code(code, {"k1": key.public_key()}, now=NOW).account_id == "alice"
        other = {"k1": keys[i - 1].public_key()}
        assert rejection(code, keys=other) == CodeRejection.BAD_SIGNATURE


def test_tampered_account_is_refused() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    assert rejection(code.replace(".alice.", ".mallory.")) == CodeRejection.BAD_SIGNATURE


def test_tampered_expiry_is_refused() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    parts = code.split(".")
    parts[4] = str(int(parts[4]) + 3600)
    assert rejection(".".join(parts)) == CodeRejection.BAD_SIGNATURE


def test_unknown_key_id_is_refused() -> None:
    code = issue_code(KEY, kid="k9", account_id="alice", now=NOW)
    assert rejection(code) == CodeRejection.UNKNOWN_KEY


def test_other_version_is_refused_as_such() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    assert rejection("QP2" + code[3:]) == CodeRejection.UNKNOWN_VERSION


@pytest.mark.parametrize(
    "garbage", ["", "hello", "QP1", "QP1.k1.alice.1.2.n", "https://example.com", "QP1." * 50]
)
def test_malformed_codes_are_refused(garbage: str) -> None:
    assert rejection(garbage) == CodeRejection.MALFORMED


def test_overlong_lifetime_is_refused_even_when_signed() -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW, lifetime=timedelta(hours=1))
    assert rejection(code) == CodeRejection.MALFORMED


def test_rotated_keys_both_verify_during_overlap() -> None:
    new_key = Ed25519PrivateKey.generate()
    keys = {"k1": KEY.public_key(), "k2": new_key.public_key()}
    old = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
    new = issue_code(new_key, kid="k2", account_id="alice", now=NOW)
    assert verify_code(old, keys, now=NOW).kid == "k1"
    assert verify_code(new, keys, now=NOW).kid == "k2"


def test_every_code_has_a_fresh_nonce() -> None:
    codes = {issue_code(KEY, kid="k1", account_id="alice", now=NOW) for _ in range(50)}
    nonces = {code.split(".")[5] for code in codes}
    assert len(nonces) == 50


def test_public_key_text_round_trips() -> None:
    text = public_key_text(KEY.public_key())
    assert len(text) == 43
    code = issue_code(KEY, kid="k1", account_id="bob", now=NOW)
    assert verify_code(code, {"k1": load_public_key(text)}, now=NOW).account_id == "bob"


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_code(KEY, kid="k1", account_id="a", now=datetime(2026, 1, 1))  # noqa: DTZ001


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_verifier_only_ever_raises_code_rejected(text: str) -> None:
    try:
        verify_code(text, KEYS, now=NOW)
    except CodeRejected:
        pass


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=152), st.characters(codec="ascii"))
def test_any_single_character_change_is_refused(position: int, char: str) -> None:
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW, nonce=b"\x00" * 12)
    if position >= len(code) or code[position] == char:
        return
    mutated = code[:position] + char + code[position + 1 :]
    with pytest.raises(CodeRejected):
        verify_code(mutated, KEYS, now=NOW)


def test_non_canonical_signature_encoding_is_refused() -> None:
    """The last base64 character of a 64-byte signature carries 4 unused bits."""
    code = issue_code(KEY, kid="k1", account_id="alice", now=NOW, nonce=b"\x00" * 12)
    body, sig = code.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(sig[-1])
    sibling = alphabet[index ^ 1]  # differs only in an unused bit
    assert rejection(f"{body}.{sig[:-1]}{sibling}") == CodeRejection.MALFORMED
