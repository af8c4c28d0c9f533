from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway_firmware.core.local_verify import LocalVerifier, NonceCache, offline_display_text
from parking_protocol.clock import FakeClock
from parking_protocol.qr_token import issue_code
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Reason


@pytest.fixture
def verifier(signing_key: Ed25519PrivateKey) -> LocalVerifier:
    return LocalVerifier({"k1": signing_key.public_key()}, Direction.ENTRY, allow=True)


def test_valid_code_opens_offline(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    decision = verifier.decide(issue(), clock.now())
    assert (decision.action, decision.reason) == (GateAction.OPEN, Reason.WELCOME)
    assert decision.decided_at == clock.now()


def test_expired_code_is_denied(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    code = issue()
    clock.advance(timedelta(minutes=5))
    decision = verifier.decide(code, clock.now())
    assert (decision.action, decision.reason) == (GateAction.DENY, Reason.CODE_EXPIRED)


def test_forged_code_is_denied(verifier: LocalVerifier, clock: FakeClock) -> None:
    forger = Ed25519PrivateKey.generate()
    code = issue_code(forger, kid="k1", account_id="alice", now=clock.now())
    decision = verifier.decide(code, clock.now())
    assert (decision.action, decision.reason) == (GateAction.DENY, Reason.CODE_BAD_SIGNATURE)


def test_unknown_key_and_garbage_are_denied(verifier: LocalVerifier, clock: FakeClock) -> None:
    other = Ed25519PrivateKey.generate()
    code = issue_code(other, kid="k9", account_id="alice", now=clock.now())
    assert verifier.decide(code, clock.now()).reason is Reason.CODE_UNKNOWN_KEY
    assert verifier.decide("https://example.com", clock.now()).reason is Reason.CODE_MALFORMED


def test_code_used_twice_offline_is_replayed(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    code = issue()
    assert verifier.decide(code, clock.now()).action is GateAction.OPEN
    second = verifier.decide(code, clock.now() + timedelta(seconds=10))
    assert (second.action, second.reason) == (GateAction.DENY, Reason.CODE_REPLAYED)


def test_code_answered_online_cannot_be_reused_offline(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    code = issue()
    verifier.remember(code, clock.now())
    assert verifier.decide(code, clock.now()).reason is Reason.CODE_REPLAYED


def test_deny_listed_account_is_refused(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    verifier.update_denylist(["mallory"])
    decision = verifier.decide(issue("mallory"), clock.now())
    assert (decision.action, decision.reason) == (GateAction.DENY, Reason.ACCOUNT_BLOCKED)
    assert verifier.decide(issue("alice"), clock.now()).action is GateAction.OPEN
    verifier.update_denylist([])
    assert verifier.decide(issue("mallory", nonce=b"x" * 12), clock.now()).action is (
        GateAction.OPEN
    )


def test_deny_policy_keeps_valid_codes_out_but_reports_bad_codes_truthfully(
    signing_key: Ed25519PrivateKey, issue: Callable[..., str], clock: FakeClock
) -> None:
    verifier = LocalVerifier({"k1": signing_key.public_key()}, Direction.EXIT, allow=False)
    assert verifier.decide(issue(), clock.now()).reason is Reason.SERVICE_UNAVAILABLE
    assert verifier.decide("junk", clock.now()).reason is Reason.CODE_MALFORMED


def test_nonce_cache_forgets_expired_codes_and_stays_bounded(clock: FakeClock) -> None:
    cache = NonceCache(capacity=3)
    now = clock.now()
    cache.add("old", now + timedelta(seconds=1), now)
    later = now + timedelta(seconds=2)
    cache.add("a", later + timedelta(minutes=1), later)
    assert "old" not in cache
    for nonce in "bcd":
        cache.add(nonce, later + timedelta(minutes=1), later)
    assert len(cache) == 3
    assert "a" not in cache
    assert "d" in cache


def test_offline_display_texts(verifier: LocalVerifier, clock: FakeClock) -> None:
    denied = verifier.decide("junk", clock.now())
    assert offline_display_text(denied, Direction.ENTRY) == DENY_TEXT[Reason.CODE_MALFORMED]


def test_nonces_restored_from_the_last_run_are_refused_as_replayed(
    signing_key: Ed25519PrivateKey, issue: Callable[..., str], clock: FakeClock
) -> None:
    code = issue()
    before = LocalVerifier({"k1": signing_key.public_key()}, Direction.ENTRY, allow=True)
    decision, spent = before.decide_spending(code, clock.now())
    assert decision.action is GateAction.OPEN
    assert spent is not None
    assert before.nonces.entries() == [spent]

    after = LocalVerifier({"k1": signing_key.public_key()}, Direction.ENTRY, allow=True)
    clock.advance(timedelta(seconds=30))
    after.restore_spent([spent], clock.now())
    assert after.decide(code, clock.now()).reason is Reason.CODE_REPLAYED


def test_expired_nonces_are_not_restored(
    verifier: LocalVerifier, issue: Callable[..., str], clock: FakeClock
) -> None:
    spent = verifier.remember(issue(), clock.now())
    assert spent is not None
    fresh = LocalVerifier({}, Direction.ENTRY, allow=True)
    fresh.restore_spent([spent], spent.expires_at)
    assert len(fresh.nonces) == 0


def test_a_refused_code_spends_nothing(verifier: LocalVerifier, clock: FakeClock) -> None:
    assert verifier.decide_spending("junk", clock.now())[1] is None
    assert verifier.remember("junk", clock.now()) is None
    assert len(verifier.nonces) == 0
