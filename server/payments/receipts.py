"""Receipts: what a settled stay cost, why (line items, tariff version) and how it was paid."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session, col, select

from parking_protocol.types import Money
from server.errors import ConflictError
from server.lots.models import Lot
from server.payments.models import ReceiptRead, Refund
from server.payments.service import payment_read, refund_read, refunded_minor, session_payments
from server.pricing.models import LineItemRead
from server.sessions.models import ParkingSession, SessionState

__all__ = ["receipt", "render_receipt"]

TEMPLATES = Path(__file__).parent / "templates"


def receipt(db: Session, parking: ParkingSession) -> ReceiptRead:
    """The receipt of a closed stay (an open stay has none yet: 409)."""
    if parking.state != SessionState.CLOSED:
        raise ConflictError("the stay is not settled yet: no receipt")
    lot = db.get(Lot, parking.lot_id)
    payments = session_payments(db, parking.session_id)
    done = refunded_minor(db, [p.payment_id for p in payments])
    refunds = db.exec(
        select(Refund)
        .where(Refund.session_id == parking.session_id)
        .order_by(col(Refund.created_at), col(Refund.refund_id))
    ).all()
    currency = parking.currency
    outstanding = sum(p.amount_minor for p in payments if p.status == "owed")
    duration = None
    if parking.exited_at is not None:
        duration = int((parking.exited_at - parking.entered_at).total_seconds())
    return ReceiptRead(
        receipt_id=f"R-{parking.session_id}",
        session_id=parking.session_id,
        account_id=parking.account_id,
        lot_id=parking.lot_id,
        lot_name=lot.name if lot is not None else parking.lot_id,
        entered_at=parking.entered_at,
        exited_at=parking.exited_at,
        duration_s=duration,
        tariff_version=parking.tariff_version,
        line_items=[LineItemRead(**item) for item in json.loads(parking.quote_json or "[]")],
        amount=Money(amount_minor=parking.amount_minor or 0, currency=currency),
        settlement=parking.settlement,
        payments=[payment_read(p, done.get(p.payment_id, 0)) for p in payments],
        refunds=[refund_read(r) for r in refunds],
        refunded=Money(amount_minor=sum(done.values()), currency=currency),
        outstanding=Money(amount_minor=outstanding, currency=currency),
    )


@cache
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )


def _money(amount_minor: int, currency: str) -> str:
    return Money(amount_minor=amount_minor, currency=currency).display()


def render_receipt(data: ReceiptRead) -> str:
    """The printable HTML page of a receipt (no external assets)."""
    return _environment().get_template("receipt.html").render(r=data, money=_money)
