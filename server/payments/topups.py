"""Topping up a wallet by card: the card provider takes the money, then the ledger moves it
from the provider's clearing account into the wallet, once per Idempotency-Key.

The provider is asked under a key derived from the request's key, so a retry after a lost
answer finds the capture again instead of charging twice; nothing is booked until the
capture is confirmed. A decline answers :class:`PaymentRequired` (402), a timeout or a
provider failure :class:`PaymentUnavailable` (503); neither books anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from parking_protocol.types import Money
from server.accounts import service as accounts
from server.accounts.service import TopupOutcome
from server.audit import service as audit
from server.errors import UnprocessableError
from server.payments.busy import busy_means_retry
from server.payments.provider import (
    ChargeContext,
    PaymentDeclined,
    PaymentError,
    PaymentKeyReused,
    PaymentProvider,
    PaymentProviders,
    PaymentTimeout,
)
from server.payments.service import PaymentRequired, PaymentUnavailable

__all__ = ["card_topup", "provider_key"]


def provider_key(account_id: str, idempotency_key: str) -> str:
    """The key the card provider sees for a top-up (namespaced apart from stay payments)."""
    return f"topup:{account_id}:{idempotency_key}"


def _capture(provider: PaymentProvider, ctx: ChargeContext, amount: Money, key: str) -> str:
    auth = provider.authorise(ctx, amount, key=key)
    try:
        return provider.capture(ctx, auth, key=key)
    except PaymentTimeout:
        raise  # not voided: the retry with the key may find it captured
    except PaymentError:
        provider.void(ctx, auth)
        raise


def _refused(error: PaymentError) -> PaymentRequired | PaymentUnavailable:
    """What the driver is told: why, that nothing was booked, and what to do."""
    if isinstance(error, PaymentDeclined):
        return PaymentRequired(
            f"Card declined ({error.reason}): nothing was charged. Try another card."
        )
    if isinstance(error, PaymentTimeout):
        return PaymentUnavailable(
            f"The card payment was not confirmed ({error.reason}): nothing was added yet. "
            "Try again: a retry is never charged twice."
        )
    return PaymentUnavailable(
        f"The card payment failed ({error.reason}): nothing was charged. Try again later."
    )


def card_topup(
    db: Session,
    providers: PaymentProviders,
    *,
    account_id: str,
    amount_minor: int,
    card_token: str | None,
    idempotency_key: str,
    actor: str,
    now: datetime,
) -> TopupOutcome:
    """Charge the card, then credit the wallet (debts collected from it), once per key; commits.

    ``card_token`` None: the account's card on file. The key is bound to the amount and the
    card; the same key with another one is a 422. No transaction is held while the provider
    answers (on SQLite that would hold the write lock). A database race lost while booking
    is a 503 (:mod:`server.payments.busy`): the retry with the key finds the capture.
    """
    with busy_means_retry(db):
        return _card_topup(
            db,
            providers,
            account_id=account_id,
            amount_minor=amount_minor,
            card_token=card_token,
            idempotency_key=idempotency_key,
            actor=actor,
            now=now,
        )


def _digest(account_id: str, amount_minor: int, card: str | None) -> str:
    """What a card top-up's key is bound to. ``card`` None: a booking recovered from an
    earlier attempt whose answer was lost, which knows that attempt's amount, not its card."""
    if card is None:
        return accounts.topup_request_hash(account_id, amount_minor, method="card")
    return accounts.topup_request_hash(account_id, amount_minor, method="card", card=card)


def _find(
    db: Session, account_id: str, idempotency_key: str, amount_minor: int, card: str
) -> TopupOutcome | None:
    """The stored answer to this request, None if the key is new; another request: 422.

    A recovered booking (see :func:`_digest`) answers any request for its amount: the
    first request, retried as it was, is told the money was credited.
    """
    try:
        return accounts.find_topup(
            db, account_id, idempotency_key, _digest(account_id, amount_minor, card)
        )
    except UnprocessableError:
        recovered = _digest(account_id, amount_minor, None)
        return accounts.find_topup(db, account_id, idempotency_key, recovered)


def _card_topup(
    db: Session,
    providers: PaymentProviders,
    *,
    account_id: str,
    amount_minor: int,
    card_token: str | None,
    idempotency_key: str,
    actor: str,
    now: datetime,
) -> TopupOutcome:
    account = accounts.require_account(db, account_id)
    token = card_token or account.card_token
    if token is None:
        raise UnprocessableError("choose a card to top up with: there is no card on file")
    currency = account.currency
    replay = _find(db, account_id, idempotency_key, amount_minor, token)
    if replay is not None:
        return replay
    db.rollback()
    card = providers.get("card")
    ctx = ChargeContext(db, account_id, token)
    key = provider_key(account_id, idempotency_key)
    book = _Booking(db, card, account_id, idempotency_key, actor, now)
    try:
        ref = _capture(card, ctx, Money(amount_minor=amount_minor, currency=currency), key)
    except PaymentKeyReused as reused:
        # An earlier attempt with this key, for another amount, lost its answer: the card may
        # have taken that amount. Complete and credit it, so the ledger holds what was taken;
        # bound to that amount only (its card is not known here).
        first = reused.first
        if first.currency == currency:
            try:
                book(first.amount_minor, _capture(card, ctx, first, key), card=None)
            except PaymentError as exc:
                raise _refused(exc) from None
        raise UnprocessableError(
            "Idempotency-Key was already used with a different request body "
            f"(a top-up of {first.display()})"
        ) from None
    except PaymentError as exc:
        raise _refused(exc) from None
    return book(amount_minor, ref, card=token)


@dataclass(frozen=True, slots=True)
class _Booking:
    """Credits what the card took: clearing -> wallet, debts collected, audited, committed."""

    db: Session
    card: PaymentProvider
    account_id: str
    idempotency_key: str
    actor: str
    now: datetime

    def __call__(self, amount_minor: int, ref: str, *, card: str | None) -> TopupOutcome:
        db, key = self.db, self.idempotency_key
        digest = _digest(self.account_id, amount_minor, card)
        outcome = accounts.stage_topup(
            db,
            self.account_id,
            amount_minor,
            idempotency_key=key,
            request_hash=digest,
            now=self.now,
            source=self.card.source_account(self.account_id),
            method="card",
            provider_ref=ref,
        )
        if not outcome.replayed:
            audit.record(
                db,
                actor=self.actor,
                action="account.topup",
                target_type="account",
                target_id=self.account_id,
                now=self.now,
                reason="card top-up",
                details={
                    "amount_minor": amount_minor,
                    "method": "card",
                    "provider_ref": ref,
                    "key": key[:64],
                },
            )
        return accounts.commit_topup(db, outcome, idempotency_key=key, request_hash=digest)
