"""Debts: an unpaid stay becomes a debt; the next top-up (or card charge) pays it off.

A debt is a ``payments`` row with ``method == "debt"`` and ``status == "owed"`` plus its
ledger transaction (``debt:{account}`` -> lot revenue). Collecting it posts
``wallet`` (or the card's clearing) -> ``debt:{account}`` and marks the row ``collected``.
Debts are collected whole, oldest first, so every stay is either owed or paid.

Collecting a debt updates its stay's row, so whoever collects locks those stays first
(:func:`lock_stays`, in ``session_id`` order) and the account after them: the order every
money path uses (see :mod:`server.payments.service`).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlmodel import Session, col, select

from parking_protocol.messages import new_id
from server.accounts import book
from server.accounts.ledger import collect_postings, wallet_account
from server.accounts.models import Account
from server.payments.models import Payment
from server.sessions.models import ParkingSession

__all__ = ["collect_from_wallet", "collectable", "lock_stays", "mark_collected", "owed", "split"]


def owed(db: Session, account_id: str) -> list[Payment]:
    """The account's unpaid debts, oldest first."""
    return list(
        db.exec(
            select(Payment)
            .where(Payment.account_id == account_id, Payment.status == "owed")
            .order_by(col(Payment.created_at), col(Payment.payment_id))
        ).all()
    )


def lock_stays(db: Session, account_id: str) -> frozenset[str]:
    """Lock the rows of the stays the account's debts are for, in ``session_id`` order;
    returns their ids. Call it before locking the account: collecting a debt updates its
    stay, and a refund of that stay holds the stay's row while it waits for the account."""
    ids = sorted({d.session_id for d in owed(db, account_id) if d.session_id is not None})
    if ids:
        db.exec(
            select(ParkingSession.session_id)
            .where(col(ParkingSession.session_id).in_(ids))
            .order_by(col(ParkingSession.session_id))
            .with_for_update()
        ).all()
    return frozenset(ids)


def collectable(debt: Payment, locked: Collection[str] | None) -> bool:
    """Whether ``debt`` may be collected by a transaction that locked the stays ``locked``
    (None: the caller needs no stay lock, as on SQLite's single writer)."""
    return locked is None or debt.session_id is None or debt.session_id in locked


def split(db: Session, debt: Payment, keep_minor: int, rest_key: str) -> Payment:
    """Owe ``debt`` as two: ``keep_minor`` of it under its own key, the rest as a new debt
    under ``rest_key`` (a provider key not bound to another amount). One ledger transaction
    still backs both, so the debt account's balance is unchanged."""
    if not 0 < keep_minor < debt.amount_minor:
        raise ValueError("a debt is split into two positive parts")
    rest = Payment(
        payment_id=new_id(),
        idempotency_key=rest_key,
        session_id=debt.session_id,
        account_id=debt.account_id,
        lot_id=debt.lot_id,
        method="debt",
        status="owed",
        amount_minor=debt.amount_minor - keep_minor,
        currency=debt.currency,
        transaction_id=debt.transaction_id,
        created_at=debt.created_at,
    )
    debt.amount_minor = keep_minor
    db.add_all([debt, rest])
    db.flush()
    return rest


def mark_collected(
    db: Session,
    debt: Payment,
    *,
    method: str,
    source: str,
    now: datetime,
    provider_ref: str | None = None,
) -> Payment:
    """Post the collection of ``debt`` from ``source`` and record it (once per debt)."""
    transaction_id = book.post(
        db,
        kind="collect",
        account_id=debt.account_id,
        postings=collect_postings(source, debt.account_id, debt.amount_minor),
        currency=debt.currency,
        reference=f"session:{debt.session_id}",
        now=now,
    )
    collection = Payment(
        payment_id=new_id(),
        idempotency_key=f"collect:{debt.payment_id}",
        session_id=debt.session_id,
        account_id=debt.account_id,
        lot_id=debt.lot_id,
        method=method,
        status="captured",
        amount_minor=debt.amount_minor,
        currency=debt.currency,
        provider_ref=provider_ref,
        collects_payment_id=debt.payment_id,
        transaction_id=transaction_id,
        created_at=now,
    )
    debt.status = "collected"
    db.add_all([collection, debt])
    if debt.session_id is not None:
        parking = db.get(ParkingSession, debt.session_id)
        if parking is not None and parking.settlement == "owed":
            parking.settlement = "paid"
            db.add(parking)
    db.flush()
    return collection


def collect_from_wallet(
    db: Session, account: Account, *, now: datetime, locked: Collection[str] | None = None
) -> int:
    """Pay off whole debts, oldest first, while the wallet covers them; returns the total.

    ``locked``: the stays the caller locked (:func:`lock_stays`); a debt that appeared for
    another stay since is left for the next top-up rather than locked out of order.
    """
    debts = [d for d in owed(db, account.account_id) if collectable(d, locked)]
    if not debts:
        return 0
    available = book.balance_of(db, wallet_account(account.account_id), account.currency)
    collected = 0
    for debt in debts:
        if debt.currency != account.currency or debt.amount_minor > available:
            break
        mark_collected(
            db, debt, method="wallet", source=wallet_account(account.account_id), now=now
        )
        available -= debt.amount_minor
        collected += debt.amount_minor
    return collected
