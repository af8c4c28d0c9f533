"""Debts: an unpaid stay becomes a debt; the next top-up (or card charge) pays it off.

A debt is a ``payments`` row with ``method == "debt"`` and ``status == "owed"`` plus its
ledger transaction (``debt:{account}`` -> lot revenue). Collecting it posts
``wallet`` (or the card's clearing) -> ``debt:{account}`` and marks the row ``collected``.
Debts are collected whole, oldest first, so every stay is either owed or paid.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from parking_protocol.messages import new_id
from server.accounts import book
from server.accounts.ledger import collect_postings, wallet_account
from server.accounts.models import Account
from server.payments.models import Payment
from server.sessions.models import ParkingSession

__all__ = ["collect_from_wallet", "mark_collected", "owed"]


def owed(db: Session, account_id: str) -> list[Payment]:
    """The account's unpaid debts, oldest first."""
    return list(
        db.exec(
            select(Payment)
            .where(Payment.account_id == account_id, Payment.status == "owed")
            .order_by(col(Payment.created_at), col(Payment.payment_id))
        ).all()
    )


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


def collect_from_wallet(db: Session, account: Account, *, now: datetime) -> int:
    """Pay off whole debts, oldest first, while the wallet covers them; returns the total."""
    debts = owed(db, account.account_id)
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
