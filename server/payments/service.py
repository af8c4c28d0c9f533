"""Settling stays, paying in advance, refunds, permits, validations and idempotency records.

Every function works inside the caller's transaction; the exit flow calls :func:`settle`
inside the scan event's SAVEPOINT, so the payment, its postings and the processed-event
record commit together.

Concurrency: whatever moves a stay's money locks rows in one order, the stay's row, then
the account's (``SELECT ... FOR UPDATE``), and reads what it decides on after locking. On
PostgreSQL that serialises two settlements of one wallet, a payment in advance racing the
exit scan, and two refunds of one stay; SQLite's ``BEGIN IMMEDIATE`` already serialises
every writing transaction (and ignores ``FOR UPDATE``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Session, col, select

from parking_protocol.messages import new_id
from parking_protocol.types import Money
from server.accounts import book
from server.accounts.ledger import debt_account, payment_postings, refund_postings
from server.accounts.models import Account
from server.accounts.service import lock_account
from server.audit import service as audit
from server.errors import ConflictError, DomainError, NotFoundError, UnprocessableError
from server.lots.models import Lot
from server.payments import debts
from server.payments.models import (
    IdempotencyRecord,
    Payment,
    PaymentRead,
    Permit,
    PermitCreate,
    PermitRead,
    Refund,
    RefundCreate,
    RefundRead,
    RefundsRead,
    SessionPayRead,
    Validation,
    ValidationCreate,
    ValidationRead,
)
from server.payments.provider import (
    ChargeContext,
    PaymentDeclined,
    PaymentError,
    PaymentFailed,
    PaymentKeyReused,
    PaymentProvider,
    PaymentProviders,
)
from server.pricing import service as pricing
from server.pricing.adjust import Discount, PermitCover, StayPrice, price_stay
from server.pricing.models import TariffSpec, TariffVersion, full_spec
from server.sessions.models import ParkingSession, SessionState

__all__ = [
    "PaymentRequired",
    "PaymentUnavailable",
    "Settlement",
    "add_validation",
    "already_done",
    "create_permit",
    "discounts_for",
    "idempotent",
    "list_permits",
    "pay_open_session",
    "payment_read",
    "permit_cover",
    "permit_read",
    "refund_session",
    "refunded_minor",
    "settle",
    "stay_price",
]

Model = TypeVar("Model", bound=BaseModel)


class PaymentRequired(DomainError):
    """The payment was declined (HTTP 402)."""

    status_code = 402


class PaymentUnavailable(DomainError):
    """The provider timed out or failed; nothing was taken (HTTP 503: retry later)."""

    status_code = 503


@dataclass(frozen=True, slots=True)
class Settlement:
    """What happened to the money for one stay."""

    status: Literal["free", "paid", "owed", "declined", "unavailable"]
    amount_minor: int
    method: str | None = None
    payment_id: str | None = None
    transaction_id: str | None = None
    reason: str = ""


# -- idempotency ------------------------------------------------------------------------------


def request_hash(body: object) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def already_done(db: Session, scope: str, key: str) -> bool:
    """Whether (scope, key) was used before (an answer will be a replay)."""
    return db.get(IdempotencyRecord, (scope, key)) is not None


def idempotent(
    db: Session,
    *,
    scope: str,
    key: str,
    body: object,
    model: type[Model],
    run: Callable[[], Model],
    now: datetime,
) -> tuple[Model, bool]:
    """Run ``run`` once per (scope, key); a retry gets the stored answer, another body a 422."""
    digest = request_hash(body)
    existing = db.get(IdempotencyRecord, (scope, key))
    if existing is not None:
        if existing.request_hash != digest:
            raise UnprocessableError(
                "Idempotency-Key was already used with a different request body"
            )
        return model.model_validate_json(existing.response_json), True
    result = run()
    db.add(
        IdempotencyRecord(
            scope=scope,
            key=key,
            request_hash=digest,
            response_json=result.model_dump_json(),
            created_at=now,
        )
    )
    db.flush()
    return result, False


# -- pricing a stay ---------------------------------------------------------------------------


def discounts_for(db: Session, session_id: str) -> tuple[Discount, ...]:
    rows = db.exec(
        select(Validation)
        .where(Validation.session_id == session_id)
        .order_by(col(Validation.created_at), col(Validation.validation_id))
    ).all()
    return tuple(
        Discount(kind=row.kind, value=row.value, reason=f"{row.merchant}: {row.reason}")  # type: ignore[arg-type]
        for row in rows
    )


def permit_cover(
    db: Session, account_id: str, lot_id: str, at: datetime, timezone: str
) -> PermitCover | None:
    """The account's permit for ``lot_id`` valid at ``at`` (the longest, if several)."""
    rows = db.exec(
        select(Permit).where(
            Permit.account_id == account_id, Permit.valid_from <= at, Permit.valid_until > at
        )
    ).all()
    usable = sorted(
        (p for p in rows if lot_id in p.lot_ids), key=lambda p: p.valid_until, reverse=True
    )
    if not usable:
        return None
    permit = usable[0]
    tariff = None
    if permit.tariff_json is not None:
        tariff = TariffSpec.model_validate_json(permit.tariff_json).tariff(timezone)
    return PermitCover(permit.permit_id, permit.valid_until, tariff, permit.valid_from)


def _lock_stay(db: Session, session_id: str) -> ParkingSession | None:
    """The stay's row, locked until the transaction ends and re-read (None: not stored)."""
    return db.exec(
        select(ParkingSession)
        .where(col(ParkingSession.session_id) == session_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def stay_price(
    db: Session,
    lot: Lot,
    parking: ParkingSession,
    at: datetime,
    *,
    for_update: bool = True,
) -> tuple[StayPrice, TariffVersion]:
    """What ``parking`` costs if it ends at ``at``: tariff version at entry, permit, validations.

    A stored stay is locked and re-read first, so a price about to be collected includes a
    payment in advance that committed meanwhile; a preview passes ``for_update=False``.
    """
    if for_update and sa.inspect(parking).persistent:
        _lock_stay(db, parking.session_id)  # refreshes ``parking`` in place
    version = pricing.version_at(db, lot.lot_id, parking.entered_at)
    tariff = pricing.tariff_of(version, lot.timezone)
    stay = price_stay(
        tariff,
        parking.entered_at,
        at,
        permit=permit_cover(db, parking.account_id, lot.lot_id, parking.entered_at, lot.timezone),
        discounts=discounts_for(db, parking.session_id),
        prepaid_minor=parking.prepaid_minor,
        prepaid_at=parking.prepaid_at,
    )
    return stay, version


# -- settling -----------------------------------------------------------------------------------


def _from_payment(payment: Payment) -> Settlement:
    status: Literal["paid", "owed"] = "owed" if payment.method == "debt" else "paid"
    return Settlement(
        status, payment.amount_minor, payment.method, payment.payment_id, payment.transaction_id
    )


def _record(
    db: Session,
    *,
    key: str,
    account_id: str,
    lot_id: str,
    session_id: str | None,
    method: str,
    status: str,
    source: str,
    amount: Money,
    now: datetime,
    provider_ref: str | None = None,
) -> Payment:
    transaction_id = book.post(
        db,
        kind="charge",
        account_id=account_id,
        postings=payment_postings(source, lot_id, amount.amount_minor),
        currency=amount.currency,
        reference=f"session:{session_id}",
        now=now,
    )
    payment = Payment(
        payment_id=new_id(),
        idempotency_key=key,
        session_id=session_id,
        account_id=account_id,
        lot_id=lot_id,
        method=method,
        status=status,
        amount_minor=amount.amount_minor,
        currency=amount.currency,
        provider_ref=provider_ref,
        transaction_id=transaction_id,
        created_at=now,
    )
    db.add(payment)
    db.flush()
    return payment


@dataclass(frozen=True, slots=True)
class _Capture:
    """Money a provider took under one key; ``refund_minor`` of it was given back at once."""

    key: str
    amount: Money
    ref: str
    refund_minor: int = 0
    refund_ref: str | None = None


def _authorise_and_capture(
    provider: PaymentProvider, ctx: ChargeContext, amount: Money, key: str
) -> str:
    auth = provider.authorise(ctx, amount, key=key)
    try:
        return provider.capture(ctx, auth, key=key)
    except (PaymentDeclined, PaymentFailed):
        provider.void(ctx, auth)  # a timeout is not voided: the retry may find it captured
        raise


def _take(
    provider: PaymentProvider, ctx: ChargeContext, amount: Money, key: str
) -> tuple[list[_Capture], str, PaymentError | None]:
    """Take ``amount`` under ``key``: (what was taken, the key of what was not, why not).

    A provider key is bound to the amount first asked with it. If an earlier attempt
    asked for another amount (its answer was lost, then the price moved), that attempt is
    completed and booked at *its* amount (the provider may already have taken it, so the
    ledger records what it really took), and the difference is taken under the next key,
    ``key + "+"`` (which the same rule covers), or given back at once if the price fell.
    A fresh key per amount instead would leave the first capture taken but never booked.
    """
    try:
        return (
            [_Capture(key, amount, _authorise_and_capture(provider, ctx, amount, key))],
            key,
            None,
        )
    except PaymentKeyReused as reused:
        first = reused.first
    except PaymentError as exc:
        return [], key, exc
    if first.currency != amount.currency:
        return [], key, PaymentFailed("key_reused_in_another_currency")
    try:
        ref = _authorise_and_capture(provider, ctx, first, key)
    except PaymentError as exc:
        return [], key, exc
    rest = amount.amount_minor - first.amount_minor
    if rest == 0:
        return [_Capture(key, first, ref)], key, None
    if rest > 0:
        more, failed_key, error = _take(
            provider, ctx, amount.model_copy(update={"amount_minor": rest}), f"{key}+"
        )
        return [_Capture(key, first, ref), *more], failed_key, error
    try:
        refund_ref = provider.refund(
            ctx, ref, first.model_copy(update={"amount_minor": -rest}), key=f"repriced:{key}"
        )
    except PaymentError as exc:
        return [], key, exc  # nothing booked: a retry with the key finds both again
    return [_Capture(key, first, ref, -rest, refund_ref)], key, None


def settle(
    db: Session,
    providers: PaymentProviders,
    *,
    account: Account,
    lot_id: str,
    session_id: str,
    amount: Money,
    key: str,
    now: datetime,
    allow_debt: bool,
    method: str | None = None,
    check_replay: bool = True,
) -> Settlement:
    """Collect ``amount`` for a stay at most once per ``key``.

    ``check_replay=False`` skips looking for an earlier payment with the key (the exit flow
    already knows the event is new); the key's unique index still refuses a second one.

    The stay's row, then the account's, are locked first (see the module doc). A stored
    stay that was closed, or paid in advance, since the caller priced it is not charged:
    ``unavailable`` (reason ``stay_changed``), so the caller asks for a retry.

    The provider gets the same key, so a capture whose answer was lost is found again
    rather than repeated; if the price moved meanwhile, see :func:`_take`. Declined or
    failed: with ``allow_debt`` what was not taken becomes a debt, otherwise nothing is
    recorded and the caller denies.
    """
    seen = db.get(ParkingSession, session_id)
    priced = None if seen is None else (seen.state, seen.prepaid_minor, seen.prepaid_at)
    stay = _lock_stay(db, session_id)
    account = lock_account(db, account.account_id) or account
    if check_replay:
        existing = db.exec(select(Payment).where(Payment.idempotency_key == key)).first()
        if existing is not None:
            return _from_payment(existing)
    method = method or account.payment_method
    if stay is not None and (
        stay.state != SessionState.OPEN
        or (stay.state, stay.prepaid_minor, stay.prepaid_at) != priced
    ):
        return Settlement("unavailable", amount.amount_minor, method, reason="stay_changed")
    if amount.amount_minor <= 0:
        return Settlement("free", 0)
    provider = providers.get(method)
    ctx = ChargeContext(db, account.account_id, account.card_token)
    taken, failed_key, error = _take(provider, ctx, amount, key)
    if error is not None and not allow_debt:
        # Nothing is booked, even what was taken: a retry with ``key`` finds it again.
        status: Literal["declined", "unavailable"] = (
            "declined" if isinstance(error, PaymentDeclined) else "unavailable"
        )
        return Settlement(status, amount.amount_minor, method, reason=error.reason)
    booked: list[Payment] = []
    for capture in taken:
        payment = _record(
            db,
            key=capture.key,
            account_id=account.account_id,
            lot_id=lot_id,
            session_id=session_id,
            method=method,
            status="captured",
            source=provider.source_account(account.account_id),
            amount=capture.amount,
            now=now,
            provider_ref=capture.ref,
        )
        if capture.refund_minor:
            _book_refund(
                db,
                provider,
                payment,
                capture.refund_minor,
                provider_ref=capture.refund_ref,
                reason="the price fell since this payment's first attempt",
                actor="settle",
                now=now,
            )
        booked.append(payment)
    if error is not None:
        owed = amount.amount_minor - sum(c.amount.amount_minor - c.refund_minor for c in taken)
        debt = _record(
            db,
            key=failed_key,
            account_id=account.account_id,
            lot_id=lot_id,
            session_id=session_id,
            method="debt",
            status="owed",
            source=debt_account(account.account_id),
            amount=amount.model_copy(update={"amount_minor": owed}),
            now=now,
        )
        return Settlement(
            "owed", amount.amount_minor, "debt", debt.payment_id, debt.transaction_id, error.reason
        )
    if method == "card":
        _collect_by_card(db, providers, account, now)
    first = booked[0]
    return Settlement("paid", amount.amount_minor, method, first.payment_id, first.transaction_id)


def _collect_by_card(
    db: Session, providers: PaymentProviders, account: Account, now: datetime
) -> None:
    """A successful card charge also pays off the account's debts (each once, per its key)."""
    card = providers.get("card")
    ctx = ChargeContext(db, account.account_id, account.card_token)
    for debt in debts.owed(db, account.account_id):
        # The debt's own key: if a capture behind a timeout did go through, it is found again.
        key = debt.idempotency_key
        try:
            auth = card.authorise(
                ctx, Money(amount_minor=debt.amount_minor, currency=debt.currency), key=key
            )
            ref = card.capture(ctx, auth, key=key)
        except PaymentError:
            return  # it stays owed; the next charge or top-up tries again
        debts.mark_collected(
            db,
            debt,
            method="card",
            source=card.source_account(account.account_id),
            now=now,
            provider_ref=ref,
        )


def pay_open_session(
    db: Session,
    providers: PaymentProviders,
    *,
    lot: Lot,
    parking: ParkingSession,
    account: Account,
    method: str | None,
    key: str,
    now: datetime,
) -> SessionPayRead:
    """Pay an open stay now, once per ``key``; leaving within the exit grace then costs
    nothing more. The same key with another method is a 422."""

    def run() -> SessionPayRead:
        settled = _prepay(
            db,
            providers,
            lot=lot,
            parking=parking,
            account=account,
            method=method,
            key=key,
            now=now,
        )
        version = pricing.version_at(db, lot.lot_id, parking.entered_at)
        grace = pricing.tariff_of(version, lot.timezone).exit_grace_minutes
        return SessionPayRead(
            session_id=parking.session_id,
            status=settled.status,
            amount=Money(amount_minor=settled.amount_minor, currency=parking.currency),
            method=settled.method,
            payment_id=settled.payment_id,
            exit_by=now + timedelta(minutes=grace),
        )

    result, _replayed = idempotent(
        db,
        scope=f"session-pay:{parking.session_id}",
        key=key,
        body={"method": method},
        model=SessionPayRead,
        run=run,
        now=now,
    )
    return result


def _prepay(
    db: Session,
    providers: PaymentProviders,
    *,
    lot: Lot,
    parking: ParkingSession,
    account: Account,
    method: str | None,
    key: str,
    now: datetime,
) -> Settlement:
    """Lock the stay, then check and price it: an exit that closed it meanwhile wins."""
    stored = _lock_stay(db, parking.session_id)
    if stored is None or stored.state != SessionState.OPEN:
        raise ConflictError(f"session {parking.session_id!r} is already closed")
    stay, _version = stay_price(db, lot, stored, now)
    amount = Money(amount_minor=stay.due_minor, currency=stay.quote.amount.currency)
    settled = settle(
        db,
        providers,
        account=account,
        lot_id=lot.lot_id,
        session_id=parking.session_id,
        amount=amount,
        key=f"prepay:{parking.session_id}:{key}",
        now=now,
        allow_debt=False,
        method=method,
    )
    parking = stored  # the same object when it came from this session; fresh either way
    if settled.status == "declined":
        raise PaymentRequired(f"payment declined ({settled.reason}): top up or change the card")
    if settled.status == "unavailable":
        raise PaymentUnavailable(f"payment not confirmed ({settled.reason}): try again")
    parking.prepaid_minor += settled.amount_minor
    parking.prepaid_at = now
    parking.payment_method = settled.method or parking.payment_method
    db.add(parking)
    db.flush()
    return settled


# -- refunds ------------------------------------------------------------------------------------


def refunded_minor(db: Session, payment_ids: list[str]) -> dict[str, int]:
    if not payment_ids:
        return {}
    rows = db.exec(
        select(Refund.payment_id, sa.func.sum(Refund.amount_minor))
        .where(col(Refund.payment_id).in_(payment_ids))
        .group_by(col(Refund.payment_id))
    ).all()
    return {payment_id: int(total) for payment_id, total in rows}


def session_payments(db: Session, session_id: str) -> list[Payment]:
    return list(
        db.exec(
            select(Payment)
            .where(Payment.session_id == session_id)
            .order_by(col(Payment.created_at), col(Payment.payment_id))
        ).all()
    )


def refund_session(
    db: Session,
    providers: PaymentProviders,
    *,
    parking: ParkingSession,
    data: RefundCreate,
    key: str,
    now: datetime,
) -> tuple[list[RefundRead], bool]:
    """Give back part or all of what a stay was paid, once per ``key``; audited.

    Returns the refunds and whether they are a replay of an earlier request with the key.
    """

    def run() -> RefundsRead:
        return RefundsRead(
            refunds=_refund(db, providers, parking=parking, data=data, key=key, now=now)
        )

    result, replayed = idempotent(
        db,
        scope=f"refund:{parking.session_id}",
        key=key,
        body=data.model_dump(mode="json"),
        model=RefundsRead,
        run=run,
        now=now,
    )
    return result.refunds, replayed


def _refund(
    db: Session,
    providers: PaymentProviders,
    *,
    parking: ParkingSession,
    data: RefundCreate,
    key: str,
    now: datetime,
) -> list[RefundRead]:
    """Newest payment first, each back to where it came from; what is left to refund is
    read after locking the stay and the account, so two refunds never give back the same
    money."""
    _lock_stay(db, parking.session_id)
    lock_account(db, parking.account_id)
    paid = [p for p in session_payments(db, parking.session_id) if p.status == "captured"]
    done = refunded_minor(db, [p.payment_id for p in paid])
    refundable = sum(p.amount_minor - done.get(p.payment_id, 0) for p in paid)
    if refundable <= 0:
        raise ConflictError("nothing left to refund on this session")
    wanted = refundable if data.amount_minor is None else data.amount_minor
    if wanted > refundable:
        raise UnprocessableError(
            f"at most {refundable} minor units can be refunded on this session"
        )
    account = db.get(Account, parking.account_id)
    card_token = account.card_token if account is not None else None
    refunds: list[RefundRead] = []
    for payment in reversed(paid):
        if wanted == 0:
            break
        part = min(wanted, payment.amount_minor - done.get(payment.payment_id, 0))
        if part <= 0:
            continue
        provider = providers.get(payment.method)
        money = Money(amount_minor=part, currency=payment.currency)
        ctx = ChargeContext(db, payment.account_id, card_token)
        try:
            provider_ref = provider.refund(
                ctx, payment.provider_ref or "", money, key=f"refund:{key}:{payment.payment_id}"
            )
        except PaymentError as exc:
            raise PaymentUnavailable(f"refund not confirmed ({exc.reason}): try again") from exc
        refund = _book_refund(
            db,
            provider,
            payment,
            part,
            provider_ref=provider_ref,
            reason=data.reason,
            actor=data.actor,
            now=now,
        )
        refunds.append(refund_read(refund))
        wanted -= part
    return refunds


def _book_refund(
    db: Session,
    provider: PaymentProvider,
    payment: Payment,
    part: int,
    *,
    provider_ref: str | None,
    reason: str,
    actor: str,
    now: datetime,
) -> Refund:
    """Post and record ``part`` of ``payment`` given back by its provider; audited."""
    transaction_id = book.post(
        db,
        kind="refund",
        account_id=payment.account_id,
        postings=refund_postings(payment.lot_id, provider.source_account(payment.account_id), part),
        currency=payment.currency,
        reference=f"session:{payment.session_id}",
        now=now,
    )
    refund = Refund(
        refund_id=new_id(),
        payment_id=payment.payment_id,
        session_id=payment.session_id,
        amount_minor=part,
        currency=payment.currency,
        reason=reason,
        actor=actor,
        provider_ref=provider_ref,
        transaction_id=transaction_id,
        created_at=now,
    )
    db.add(refund)
    db.flush()
    audit.record(
        db,
        actor=actor,
        action="payment.refund",
        target_type="session",
        target_id=payment.session_id or "",
        now=now,
        reason=reason,
        details={
            "refund_id": refund.refund_id,
            "payment_id": payment.payment_id,
            "method": payment.method,
            "amount_minor": part,
            "currency": payment.currency,
            "transaction_id": transaction_id,
        },
    )
    return refund


def refund_read(refund: Refund) -> RefundRead:
    return RefundRead(
        refund_id=refund.refund_id,
        session_id=refund.session_id,
        payment_id=refund.payment_id,
        amount=Money(amount_minor=refund.amount_minor, currency=refund.currency),
        reason=refund.reason,
        actor=refund.actor,
        created_at=refund.created_at,
    )


def payment_read(payment: Payment, refunded: int) -> PaymentRead:
    return PaymentRead(
        payment_id=payment.payment_id,
        session_id=payment.session_id,
        method=payment.method,
        status=payment.status,
        amount=Money(amount_minor=payment.amount_minor, currency=payment.currency),
        refunded_minor=refunded,
        created_at=payment.created_at,
    )


# -- permits and validations ----------------------------------------------------------------------


def create_permit(db: Session, data: PermitCreate, *, now: datetime) -> Permit:
    if db.get(Account, data.account_id) is None:
        raise NotFoundError(f"account {data.account_id!r} not found")
    permit = Permit(
        permit_id=new_id(),
        account_id=data.account_id,
        lot_ids=sorted(set(data.lot_ids)),
        valid_from=data.valid_from,
        valid_until=data.valid_until,
        tariff_json=None if data.tariff is None else full_spec(data.tariff).model_dump_json(),
        note=data.note,
        created_at=now,
    )
    db.add(permit)
    db.flush()
    return permit


def list_permits(db: Session, account_id: str) -> list[Permit]:
    return list(
        db.exec(
            select(Permit)
            .where(Permit.account_id == account_id)
            .order_by(col(Permit.valid_from), col(Permit.permit_id))
        ).all()
    )


def permit_read(permit: Permit) -> PermitRead:
    return PermitRead(
        permit_id=permit.permit_id,
        account_id=permit.account_id,
        lot_ids=list(permit.lot_ids),
        valid_from=permit.valid_from,
        valid_until=permit.valid_until,
        tariff=None if permit.tariff_json is None else json.loads(permit.tariff_json),
        note=permit.note,
        created_at=permit.created_at,
    )


def add_validation(
    db: Session, parking: ParkingSession, data: ValidationCreate, *, now: datetime
) -> ValidationRead:
    """Record a merchant validation on an open stay (it applies when the stay is settled)."""
    if parking.state != SessionState.OPEN:
        raise ConflictError("validations apply before settlement: the session is closed")
    row = Validation(
        validation_id=new_id(),
        session_id=parking.session_id,
        kind=data.kind,
        value=data.value,
        reason=data.reason,
        merchant=data.merchant,
        created_at=now,
    )
    db.add(row)
    db.flush()
    return ValidationRead.model_validate(row, from_attributes=True)
