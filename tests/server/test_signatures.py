"""The service's signature checker: results are used once, only under their key, and the
time window is still checked where the code is decided."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from parking_protocol.qr_token import CodeRejected, issue_code, verify_code
from parking_protocol.types import CodeRejection
from server.signatures import SignatureChecker

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}


def _checked(checker: SignatureChecker, count: int) -> None:
    deadline = time.monotonic() + 5
    while checker.checked < count:
        assert time.monotonic() < deadline, "the checker did not get to the codes"
        time.sleep(0.005)


def test_signatures_checked_ahead_are_used_once_and_only_under_their_key() -> None:
    other = Ed25519PrivateKey.generate()
    checker = SignatureChecker()
    checker.start()
    try:
        good = issue_code(KEY, kid="k1", account_id="alice", now=NOW)
        forged = issue_code(other, kid="k1", account_id="alice", now=NOW)
        checker.submit(forged, KEYS)  # found bad: not kept
        checker.submit("not a code", KEYS)
        checker.submit(good, KEYS)
        _checked(checker, 1)
        assert verify_code(good, KEYS, now=NOW, proven=checker.proven).account_id == "alice"
        assert checker.used == 1
        assert checker.proven(good) is None  # used up
        # Checked under one key, the result does not count under another with the same kid.
        checker.submit(good, KEYS)
        _checked(checker, 2)
        with pytest.raises(CodeRejected) as wrong_key:
            verify_code(good, {"k1": other.public_key()}, now=NOW, proven=checker.proven)
        assert wrong_key.value.reason is CodeRejection.BAD_SIGNATURE
        assert checker.used == 2
        with pytest.raises(CodeRejected) as bad:
            verify_code(forged, KEYS, now=NOW, proven=checker.proven)
        assert bad.value.reason is CodeRejection.BAD_SIGNATURE
        # The time window is still checked where the code is decided.
        late = issue_code(KEY, kid="k1", account_id="bob", now=NOW)
        checker.submit(late, KEYS)
        _checked(checker, 3)
        with pytest.raises(CodeRejected) as expired:
            verify_code(late, KEYS, now=NOW + timedelta(minutes=5), proven=checker.proven)
        assert expired.value.reason is CodeRejection.EXPIRED
    finally:
        checker.stop()


def test_the_signature_checker_keeps_at_most_its_capacity_and_ignores_work_when_stopped() -> None:
    checker = SignatureChecker(capacity=3)
    codes = [issue_code(KEY, kid="k1", account_id=f"a{i}", now=NOW) for i in range(5)]
    checker.submit(codes[0], KEYS)  # not started: ignored
    checker.start()
    try:
        for code in codes:
            checker.submit(code, KEYS)
        _checked(checker, 5)
        kept = [checker.proven(code) is not None for code in codes]
        assert kept == [False, False, True, True, True]
    finally:
        checker.stop()
    assert checker.checked == 5  # codes[0] was checked once, when submitted again
