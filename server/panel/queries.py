"""Read-only money queries for the panel (the ledger and payments, as people look at them).

Revenue comes from the ledger itself: ``revenue:lot:{lot}`` postings (charges, debts included:
a stay is earned when it ends) and ``refunds:lot:{lot}`` postings (money given back), each
dated by its transaction. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlmodel import Session, col, or_, select

from server.accounts.ledger import refunds_account, revenue_account
from server.accounts.models import LedgerTransaction, Posting
from server.payments.models import Payment, Refund

__all__ = [
    "LotMoney",
    "Revenue",
    "outstanding_debts",
    "payments_between",
    "refundable_by_session",
    "refunds_between",
    "revenue",
]

_REVENUE = "revenue:lot:"
_REFUNDS = "refunds:lot:"


@dataclass(slots=True)
class LotMoney:
    """One lot's money in one currency over the window, and per local day."""

    lot_id: str
    currency: str
    charged_minor: int = 0  # posted to revenue (paid or owed)
    refunded_minor: int = 0  # given back
    days: dict[date, int] = field(default_factory=dict)  # net per local day

    @property
    def net_minor(self) -> int:
        return self.charged_minor - self.refunded_minor


@dataclass(frozen=True, slots=True)
class Revenue:
    lots: tuple[LotMoney, ...]

    def currencies(self) -> list[str]:
        return sorted({item.currency for item in self.lots})

    def in_currency(self, currency: str) -> list[LotMoney]:
        return [item for item in self.lots if item.currency == currency]

    def total(self, currency: str, what: str) -> int:
        return sum(int(getattr(item, what)) for item in self.in_currency(currency))


def revenue(
    db: Session,
    *,
    since: datetime,
    until: datetime,
    zones: dict[str, str],
    lot_id: str | None = None,
) -> Revenue:
    """Charged, refunded and net per lot (and per day in the lot's zone) in [since, until)."""
    query = (
        select(
            Posting.ledger_account,
            Posting.amount_minor,
            Posting.currency,
            LedgerTransaction.created_at,
        )
        .join(LedgerTransaction, col(Posting.transaction_id) == LedgerTransaction.transaction_id)
        .where(
            col(LedgerTransaction.created_at) >= since, col(LedgerTransaction.created_at) < until
        )
    )
    if lot_id:
        query = query.where(
            col(Posting.ledger_account).in_([revenue_account(lot_id), refunds_account(lot_id)])
        )
    else:
        query = query.where(
            or_(
                col(Posting.ledger_account).startswith(_REVENUE, autoescape=True),
                col(Posting.ledger_account).startswith(_REFUNDS, autoescape=True),
            )
        )
    found: dict[tuple[str, str], LotMoney] = {}
    for ledger_account, amount, currency, at in db.exec(query):
        refund = ledger_account.startswith(_REFUNDS)
        lot = ledger_account.removeprefix(_REFUNDS if refund else _REVENUE)
        item = found.setdefault((lot, currency), LotMoney(lot, currency))
        if refund:
            item.refunded_minor -= amount  # refunds postings are negative
        else:
            item.charged_minor += amount
        day = at.astimezone(ZoneInfo(zones.get(lot, "UTC"))).date()
        item.days[day] = item.days.get(day, 0) + amount
    return Revenue(tuple(sorted(found.values(), key=lambda m: (m.currency, m.lot_id))))


def payments_between(
    db: Session,
    *,
    since: datetime,
    until: datetime,
    lot_id: str | None = None,
    limit: int = 200,
) -> list[Payment]:
    """Payments (captured, owed and collected debts) created in [since, until), newest first."""
    query = select(Payment).where(col(Payment.created_at) >= since, col(Payment.created_at) < until)
    if lot_id:
        query = query.where(Payment.lot_id == lot_id)
    query = query.order_by(col(Payment.created_at).desc(), col(Payment.payment_id)).limit(limit)
    return list(db.exec(query).all())


def refunds_between(
    db: Session,
    *,
    since: datetime,
    until: datetime,
    lot_id: str | None = None,
    limit: int = 200,
) -> list[tuple[Refund, str]]:
    """Refunds made in [since, until), newest first, each with its lot."""
    query = (
        select(Refund, Payment.lot_id)
        .join(Payment, col(Refund.payment_id) == Payment.payment_id)
        .where(col(Refund.created_at) >= since, col(Refund.created_at) < until)
    )
    if lot_id:
        query = query.where(Payment.lot_id == lot_id)
    query = query.order_by(col(Refund.created_at).desc(), col(Refund.refund_id)).limit(limit)
    return [(refund, lot) for refund, lot in db.exec(query).all()]


def outstanding_debts(
    db: Session, *, lot_id: str | None = None, account_id: str | None = None
) -> list[Payment]:
    """Every unpaid stay (whatever its date), oldest first."""
    query = select(Payment).where(Payment.status == "owed")
    if lot_id:
        query = query.where(Payment.lot_id == lot_id)
    if account_id:
        query = query.where(Payment.account_id == account_id)
    return list(db.exec(query.order_by(col(Payment.created_at), col(Payment.payment_id))).all())


def refundable_by_session(db: Session, session_ids: Sequence[str]) -> dict[str, int]:
    """What could still be refunded per session: captured payments minus their refunds."""
    ids = sorted({s for s in session_ids if s})
    if not ids:
        return {}
    paid = db.exec(
        select(Payment.session_id, sa.func.sum(Payment.amount_minor))
        .where(col(Payment.session_id).in_(ids), Payment.status == "captured")
        .group_by(col(Payment.session_id))
    ).all()
    given = db.exec(
        select(Refund.session_id, sa.func.sum(Refund.amount_minor))
        .where(col(Refund.session_id).in_(ids))
        .group_by(col(Refund.session_id))
    ).all()
    back = {session_id: int(total) for session_id, total in given if session_id}
    return {
        session_id: int(total) - back.get(session_id, 0)
        for session_id, total in paid
        if session_id is not None
    }
