"""Settling stays, paying in advance, refunds, permits, validations and idempotency records.

Every function works inside the caller's transaction; the exit flow calls :func:`settle`
inside the scan event's SAVEPOINT, so the payment, its postings and the processed-event
record commit together.

Concurrency: whatever moves money locks rows in one order (``SELECT ... FOR UPDATE``):
stays first, then the account. The stay being paid or refunded comes first; then the stays
of the account's debts that will be collected (collecting one updates its stay), by
``session_id`` (:func:`server.payments.debts.lock_stays`); then the account's row. What a
decision rests on is read after locking. The stay being paid is open and a debt's stay is
closed, so no transaction waits for a stay another holds as its first while holding one
that other needs: no deadlock between settlements, payments in advance, refunds and
top-ups. On PostgreSQL that serialises two settlements of one wallet, a payment in advance
racing the exit scan, two refunds of one stay, and a refund racing a top-up that collects
that stay's debt; SQLite's ``BEGIN IMMEDIATE`` already serialises every writing
transaction (and ignores ``FOR UPDATE``).

Provider calls are bounded in time (``PaymentProviders.call_timeout_s``; past it a call
is a :class:`~server.payments.provider.PaymentTimeout`, which a retry with the key
resolves). On SQLite every path here but a card top-up still holds the write lock while the
card provider answers; the plan is to give settle, payments in advance, refunds and debt
collection the card top-up's two phases (ask the provider with no transaction open, then
lock, re-check and book; a lost race books what the provider took and refunds or owes the
difference), the scan flow answering "scan again" meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from server.accounts.service import credit_wallet, lock_account
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
    PaymentTimeout,
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


class _NotPaid(DomainError):
    """A payment not made. ``booked_minor``: what the provider took all the same, booked
    toward the stay: the caller commits it before answering."""

    def __init__(self, detail: str, *, booked_minor: int = 0) -> None:
        super().__init__(detail)
        self.booked_minor = booked_minor


class PaymentRequired(_NotPaid):
    """The payment was declined (HTTP 402)."""

    status_code = 402


class PaymentUnavailable(_NotPaid):
    """The provider timed out or failed (HTTP 503: retry later); nothing was taken but
    ``booked_minor``."""

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
    paid_minor: int = 0  # declined or unavailable, yet taken and booked toward the stay


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
    """Money a provider took under one key: ``amount`` of it, of which ``refund_minor`` went
    back to the card at once and ``credit_minor`` to the driver's wallet (the price fell
    below it and the card refund was not confirmed); the rest pays."""

    key: str
    amount: Money
    ref: str
    refund_minor: int = 0
    refund_ref: str | None = None
    credit_minor: int = 0

    @property
    def kept_minor(self) -> int:
        return self.amount.amount_minor - self.refund_minor - self.credit_minor


@dataclass(frozen=True, slots=True)
class _Taken:
    """What :func:`_take` took (confirmed captures) and, if not all, why not (``error``) and
    the key to owe or retry the rest under: one no provider has bound to another amount, or
    for an outcome the provider left unknown, the key that finds it again."""

    captures: tuple[_Capture, ...]
    rest_key: str
    error: PaymentError | None = None

    @property
    def kept_minor(self) -> int:
        return sum(c.kept_minor for c in self.captures)


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
    provider: PaymentProvider,
    ctx: ChargeContext,
    amount: Money,
    key: str,
    *,
    refund_excess: bool = True,
) -> _Taken:
    """Take ``amount`` under ``key``; every capture the provider confirms is returned (the
    caller books each one, whatever else fails).

    A provider key is bound to the amount first asked with it. If an earlier attempt
    asked for another amount (its answer was lost, then the price moved), that attempt is
    completed at *its* amount (the provider may already have taken it, so the ledger books
    what it really took), and the difference is taken under the next key, ``key + "+"``
    (which the same rule covers). If the price fell, the excess is refunded to the card
    (``refund_excess``; a refund timing out is asked once more under its key, which finds a
    refund already made) or, if that is not confirmed, credited to the wallet.

    If completing the earlier attempt fails, nothing was taken and the rest is owed under
    ``key + "+"``; if it times out, the outcome under ``key`` is unknown, so ``key`` is the
    rest's key (collecting a debt goes through this function, which finds or completes
    that capture and takes the difference).
    """
    try:
        ref = _authorise_and_capture(provider, ctx, amount, key)
    except PaymentKeyReused as reused:
        first = reused.first
    except PaymentError as exc:
        return _Taken((), key, exc)
    else:
        return _Taken((_Capture(key, amount, ref),), key)
    if first.currency != amount.currency:
        return _Taken((), f"{key}+", PaymentFailed("key_reused_in_another_currency"))
    try:
        ref = _authorise_and_capture(provider, ctx, first, key)
    except PaymentTimeout as exc:
        return _Taken((), key, exc)
    except PaymentError as exc:
        return _Taken((), f"{key}+", exc)
    capture = _Capture(key, first, ref)
    rest = amount.amount_minor - first.amount_minor
    if rest > 0:
        more = _take(
            provider,
            ctx,
            amount.model_copy(update={"amount_minor": rest}),
            f"{key}+",
            refund_excess=refund_excess,
        )
        return _Taken((capture, *more.captures), more.rest_key, more.error)
    if rest < 0:
        capture = _give_back(provider, ctx, capture, -rest, refund=refund_excess)
    return _Taken((capture,), key)


def _give_back(
    provider: PaymentProvider, ctx: ChargeContext, capture: _Capture, excess: int, *, refund: bool
) -> _Capture:
    """Refund ``excess`` of ``capture`` to the card, else mark it for the wallet."""
    money = capture.amount.model_copy(update={"amount_minor": excess})
    for _attempt in range(2 if refund else 0):
        try:
            ref = provider.refund(ctx, capture.ref, money, key=f"repriced:{capture.key}")
        except PaymentTimeout:
            continue  # the same key again: a refund made behind the timeout is found
        except PaymentError:
            break
        return replace(capture, refund_minor=excess, refund_ref=ref)
    # Not confirmed: the wallet gets it. (Two timeouts in a row may hide a refund that was
    # made after all; the audit log names the key to check with the provider.)
    return replace(capture, credit_minor=excess)


def _next_key(db: Session, key: str) -> str:
    """``key``, or the first of ``key+``, ``key++``... no payment is booked under: a retry
    after a confirmed part was booked (the rest declined) goes on from there."""
    while db.exec(select(Payment.payment_id).where(Payment.idempotency_key == key)).first():
        key = f"{key}+"
    return key


def _book_captures(
    db: Session,
    provider: PaymentProvider,
    taken: _Taken,
    *,
    account: Account,
    lot_id: str,
    session_id: str,
    method: str,
    now: datetime,
) -> list[Payment]:
    """Book each confirmed capture as a payment for the stay (what it kept), with the
    excess refunded to the card or credited to the wallet."""
    booked: list[Payment] = []
    source = provider.source_account(account.account_id)
    for capture in taken.captures:
        payment = _record(
            db,
            key=capture.key,
            account_id=account.account_id,
            lot_id=lot_id,
            session_id=session_id,
            method=method,
            status="captured",
            source=source,
            amount=capture.amount.model_copy(
                update={"amount_minor": capture.amount.amount_minor - capture.credit_minor}
            ),
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
        _credit_excess(db, account, capture, source=source, now=now)
        booked.append(payment)
    return booked


def _credit_excess(
    db: Session, account: Account, capture: _Capture, *, source: str, now: datetime
) -> None:
    """The part of ``capture`` above the price, not refunded to the card: to the wallet."""
    if not capture.credit_minor:
        return
    transaction_id = credit_wallet(
        db,
        account,
        capture.credit_minor,
        source=source,
        key=f"excess:{capture.key}",
        provider_ref=capture.ref,
        now=now,
    )
    audit.record(
        db,
        actor="settle",
        action="account.topup",
        target_type="account",
        target_id=account.account_id,
        now=now,
        reason="the price fell below a card capture; the card refund was not confirmed",
        details={
            "amount_minor": capture.credit_minor,
            "provider_ref": capture.ref,
            "refund_key": f"repriced:{capture.key}",
            "transaction_id": transaction_id,
        },
    )


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
    already knows the event is new; a payment in advance has its own idempotency record);
    then ``key`` is followed by ``+`` until no payment is booked under it, so a retry after
    a partly taken attempt goes on where that one stopped.

    Locks, in this order (see the module doc): the stay's row, the rows of the stays whose
    debts a card charge collects, the account's row. A stored stay that was closed, or paid
    in advance, since the caller priced it is not charged: ``unavailable`` (reason
    ``stay_changed``), so the caller asks for a retry.

    The provider gets the same key, so a capture whose answer was lost is found again
    rather than repeated; if the price moved meanwhile, see :func:`_take`. Every capture
    the provider confirmed is booked, even if the rest is refused. Declined or failed:

    * with ``allow_debt``, what was not taken becomes a debt;
    * otherwise the caller denies, and what was taken counts as paid in advance toward the
      stay (``Settlement.paid_minor``; the stay's ``prepaid_minor``), so the next try owes
      only the rest. A timeout books nothing: its outcome is unknown, and a retry with the
      key finds every capture again.
    """
    seen = db.get(ParkingSession, session_id)
    priced = None if seen is None else (seen.state, seen.prepaid_minor, seen.prepaid_at)
    stay = _lock_stay(db, session_id)
    existing = None
    if check_replay:
        existing = db.exec(select(Payment).where(Payment.idempotency_key == key)).first()
    if stay is not None and (
        stay.state != SessionState.OPEN
        or (stay.state, stay.prepaid_minor, stay.prepaid_at) != priced
    ):
        # Checked before any other lock: a stay no longer to be paid takes no debt's stay.
        if existing is not None:
            return _from_payment(existing)
        method = method or account.payment_method
        return Settlement("unavailable", amount.amount_minor, method, reason="stay_changed")
    collecting = (method or account.payment_method) == "card"
    locked = debts.lock_stays(db, account.account_id) if collecting else frozenset()
    account = lock_account(db, account.account_id) or account
    if check_replay:  # again, now that the account is locked (a stay not stored locks none)
        existing = db.exec(select(Payment).where(Payment.idempotency_key == key)).first()
        if existing is not None:
            return _from_payment(existing)
    method = method or account.payment_method
    if amount.amount_minor <= 0:
        return Settlement("free", 0)
    provider = providers.get(method)
    ctx = ChargeContext(db, account.account_id, account.card_token)
    if not check_replay:
        key = _next_key(db, key)
    taken = _take(provider, ctx, amount, key)
    error = taken.error
    if error is not None and not allow_debt:
        status: Literal["declined", "unavailable"] = (
            "declined" if isinstance(error, PaymentDeclined) else "unavailable"
        )
        if isinstance(error, PaymentTimeout) or not taken.captures:
            return Settlement(status, amount.amount_minor, method, reason=error.reason)
        kept = _book_captures(
            db,
            provider,
            taken,
            account=account,
            lot_id=lot_id,
            session_id=session_id,
            method=method,
            now=now,
        )
        if stay is not None:
            stay.prepaid_minor += taken.kept_minor
            stay.payment_method = stay.payment_method or method
            db.add(stay)
            db.flush()
        return Settlement(
            status,
            amount.amount_minor,
            method,
            kept[0].payment_id,
            kept[0].transaction_id,
            error.reason,
            paid_minor=taken.kept_minor,
        )
    booked = _book_captures(
        db,
        provider,
        taken,
        account=account,
        lot_id=lot_id,
        session_id=session_id,
        method=method,
        now=now,
    )
    if error is not None:
        debt = _record(
            db,
            key=taken.rest_key,
            account_id=account.account_id,
            lot_id=lot_id,
            session_id=session_id,
            method="debt",
            status="owed",
            source=debt_account(account.account_id),
            amount=amount.model_copy(
                update={"amount_minor": amount.amount_minor - taken.kept_minor}
            ),
            now=now,
        )
        return Settlement(
            "owed", amount.amount_minor, "debt", debt.payment_id, debt.transaction_id, error.reason
        )
    if method == "card":
        _collect_by_card(db, providers, account, locked, now)
    first = booked[0]
    return Settlement("paid", amount.amount_minor, method, first.payment_id, first.transaction_id)


def _collect_by_card(
    db: Session,
    providers: PaymentProviders,
    account: Account,
    locked: frozenset[str],
    now: datetime,
) -> None:
    """A successful card charge also pays off the account's debts, each once, per its key.

    Each goes through :func:`_take`: a capture behind a timeout is found again, a key an
    earlier attempt bound to another amount is completed (the excess credited to the
    wallet). A debt the card refuses stays owed and the next one is tried; one taken only
    in part is split, the taken part collected, the rest owed under a fresh key. Only
    debts whose stays were locked before the account are collected (the lock order).
    """
    card = providers.get("card")
    ctx = ChargeContext(db, account.account_id, account.card_token)
    source = card.source_account(account.account_id)
    for debt in debts.owed(db, account.account_id):
        if not debts.collectable(debt, locked):
            continue
        money = Money(amount_minor=debt.amount_minor, currency=debt.currency)
        taken = _take(card, ctx, money, debt.idempotency_key, refund_excess=False)
        if not taken.captures:
            continue  # it stays owed; the next charge or top-up tries again
        if taken.error is not None:
            debts.split(db, debt, taken.kept_minor, taken.rest_key)
        debts.mark_collected(
            db, debt, method="card", source=source, now=now, provider_ref=taken.captures[0].ref
        )
        for capture in taken.captures:
            _credit_excess(db, account, capture, source=source, now=now)


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
    """Lock the stay, then check and price it: an exit that closed it meanwhile wins.

    Replays are the idempotency record's (:func:`pay_open_session`), so :func:`settle` is
    asked without its own: after a refusal that still took part of the price, a retry with
    the same key goes on under the next provider key for what is left.
    """
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
        check_replay=False,
    )
    parking = stored  # the same object when it came from this session; fresh either way
    if settled.status in ("declined", "unavailable"):
        taken = ""
        if settled.paid_minor:
            part = amount.model_copy(update={"amount_minor": settled.paid_minor})
            rest = amount.model_copy(
                update={"amount_minor": amount.amount_minor - settled.paid_minor}
            )
            taken = (
                f"; {part.display()} was taken and counts toward this stay, "
                f"{rest.display()} is left"
            )
        if settled.status == "declined":
            raise PaymentRequired(
                f"payment declined ({settled.reason}){taken}: top up or change the card",
                booked_minor=settled.paid_minor,
            )
        raise PaymentUnavailable(
            f"payment not confirmed ({settled.reason}){taken}: try again",
            booked_minor=settled.paid_minor,
        )
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
