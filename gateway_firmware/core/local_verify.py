"""Offline verification: what a lane decides on its own when the central service is silent.

Pure: it holds the public keys, a bounded record of nonces used at this lane, and the lot's
deny-list; it is fed ``now`` and returns an :class:`OfflineDecision`. A nonce is single use
locally, so a screenshot shown twice while offline opens once. Every nonce it records is
handed back as a :class:`SpentNonce` for the app to keep on disk (the outbox) and give to
the next run (:meth:`LocalVerifier.restore_spent`), so a restart does not make it usable again.

>>> # verifier = LocalVerifier(keys, Direction.ENTRY, allow=True)
>>> # verifier.decide(code, now=now).action
>>> # <GateAction.OPEN: 'open'>
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from parking_protocol.messages import OfflineDecision
from parking_protocol.qr_token import CodeClaims, CodeRejected, verify_code
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Reason

__all__ = ["LocalVerifier", "NonceCache", "SpentNonce", "offline_display_text"]


@dataclass(frozen=True, slots=True)
class SpentNonce:
    """A code's nonce used up at this lane; worth remembering until the code expires."""

    nonce: str
    expires_at: datetime


class NonceCache:
    """Nonces of codes used at this lane, each kept until its code expires (bounded)."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._expires: OrderedDict[str, datetime] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._expires

    def add(self, nonce: str, expires_at: datetime, now: datetime) -> None:
        self._expires.pop(nonce, None)
        self._expires[nonce] = expires_at
        self._prune(now)

    def restore(self, spent: Iterable[SpentNonce], now: datetime) -> None:
        """Add ``spent`` (oldest first, e.g. from the last run) and prune once."""
        for entry in spent:
            self._expires.pop(entry.nonce, None)
            self._expires[entry.nonce] = entry.expires_at
        self._prune(now)

    def entries(self) -> list[SpentNonce]:
        """What is remembered, oldest first."""
        return [SpentNonce(nonce, exp) for nonce, exp in self._expires.items()]

    def _prune(self, now: datetime) -> None:
        # A nonce whose code has expired can be forgotten: verification refuses the code anyway.
        for nonce in [n for n, exp in self._expires.items() if exp <= now]:
            del self._expires[nonce]
        while len(self._expires) > self.capacity:
            self._expires.popitem(last=False)


class LocalVerifier:
    """Verifies codes offline and applies the lane's offline policy.

    ``allow`` is the policy for this lane's direction: True opens for a code that verifies
    and is neither replayed nor deny-listed; False keeps the barrier closed.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        direction: Direction,
        *,
        allow: bool,
        nonce_capacity: int = 10_000,
    ) -> None:
        self._keys = dict(keys)
        self.direction = direction
        self.allow = allow
        self.nonces = NonceCache(nonce_capacity)
        self.denied_accounts: frozenset[str] = frozenset()

    def update_denylist(self, accounts: Iterable[str]) -> None:
        """Replace the deny-list (from the lot's retained DenyList message)."""
        self.denied_accounts = frozenset(accounts)

    def restore_spent(self, spent: Iterable[SpentNonce], now: datetime) -> None:
        """Take back the nonces used before a restart (expired ones are dropped)."""
        self.nonces.restore(spent, now)

    def remember(self, code: str, now: datetime) -> SpentNonce | None:
        """Record that ``code`` was used (the central service opened for it); the nonce
        recorded, None for a code that does not verify (nothing to remember)."""
        try:
            claims = verify_code(code, self._keys, now=now)
        except CodeRejected:
            return None
        return self._spend(claims, now)

    def check(self, code: str, now: datetime) -> CodeClaims | Reason:
        """The code's claims, or the reason it must be refused (does not record the nonce)."""
        try:
            claims = verify_code(code, self._keys, now=now)
        except CodeRejected as exc:
            return Reason.from_rejection(exc.reason)
        if claims.nonce in self.nonces:
            return Reason.CODE_REPLAYED
        if claims.account_id in self.denied_accounts:
            return Reason.ACCOUNT_BLOCKED
        return claims

    def decide(self, code: str, now: datetime) -> OfflineDecision:
        """Decide for ``code`` at ``now`` and record its nonce as used."""
        return self.decide_spending(code, now)[0]

    def decide_spending(
        self, code: str, now: datetime
    ) -> tuple[OfflineDecision, SpentNonce | None]:
        """:meth:`decide`, and the nonce it recorded (None when the code was refused)."""
        result = self.check(code, now)
        if isinstance(result, Reason):
            return OfflineDecision(action=GateAction.DENY, reason=result, decided_at=now), None
        spent = self._spend(result, now)
        if not self.allow:
            denied = OfflineDecision(
                action=GateAction.DENY, reason=Reason.SERVICE_UNAVAILABLE, decided_at=now
            )
            return denied, spent
        return OfflineDecision(action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=now), spent

    def _spend(self, claims: CodeClaims, now: datetime) -> SpentNonce:
        self.nonces.add(claims.nonce, claims.expires_at, now)
        return SpentNonce(claims.nonce, claims.expires_at)


def offline_display_text(decision: OfflineDecision, direction: Direction) -> str:
    """What the display shows for an offline decision."""
    if decision.action is GateAction.OPEN:
        return "Welcome" if direction is Direction.ENTRY else "Goodbye"
    return DENY_TEXT.get(decision.reason, "Please call the operator")
