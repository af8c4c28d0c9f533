"""Data access for parking sessions, code nonces, processed events and dead letters."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from parking_protocol.messages import new_id
from parking_protocol.types import Money
from server.errors import NotFoundError
from server.pricing.engine import Quote
from server.sessions.models import (
    DeadLetter,
    LineItemRead,
    ParkingSession,
    ProcessedEvent,
    SessionRead,
    SessionState,
    UsedNonce,
)

__all__ = [
    "close_session",
    "count_open",
    "find_open",
    "get_processed",
    "list_sessions",
    "nonce_used",
    "open_session",
    "record_dead_letter",
    "record_nonce",
    "record_processed",
    "require_session",
    "session_read",
]


def find_open(db: Session, account_id: str, lot_id: str) -> ParkingSession | None:
    return db.exec(
        select(ParkingSession).where(
            ParkingSession.account_id == account_id,
            ParkingSession.lot_id == lot_id,
            ParkingSession.state == SessionState.OPEN,
        )
    ).first()


def count_open(db: Session, lot_id: str) -> int:
    total = db.exec(
        select(sa.func.count())
        .select_from(ParkingSession)
        .where(ParkingSession.lot_id == lot_id, ParkingSession.state == SessionState.OPEN)
    ).one()
    return int(total)


def open_session(
    db: Session,
    *,
    account_id: str,
    lot_id: str,
    gate_id: str,
    event_id: str,
    entered_at: datetime,
    currency: str,
    offline: bool = False,
    lost_ticket: bool = False,
) -> ParkingSession:
    parking = ParkingSession(
        session_id=new_id(),
        account_id=account_id,
        lot_id=lot_id,
        state=SessionState.OPEN,
        entry_gate_id=gate_id,
        entry_event_id=event_id,
        entered_at=entered_at,
        offline_entry=offline,
        currency=currency,
        lost_ticket=lost_ticket,
    )
    db.add(parking)
    db.flush()
    return parking


def close_session(
    db: Session,
    parking: ParkingSession,
    *,
    gate_id: str,
    event_id: str,
    exited_at: datetime,
    quote: Quote,
    settlement: str,
    charge_transaction_id: str | None,
    offline: bool = False,
    tariff_version: int | None = None,
    payment_method: str | None = None,
) -> ParkingSession:
    parking.state = SessionState.CLOSED
    parking.exit_gate_id = gate_id
    parking.exit_event_id = event_id
    parking.exited_at = exited_at
    parking.offline_exit = offline
    parking.amount_minor = quote.amount.amount_minor
    parking.currency = quote.amount.currency
    parking.settlement = settlement
    parking.charge_transaction_id = charge_transaction_id
    parking.tariff_version = tariff_version
    parking.payment_method = payment_method
    parking.quote_json = json.dumps([asdict(item) for item in quote.line_items])
    db.add(parking)
    db.flush()
    return parking


def nonce_used(db: Session, nonce: str) -> bool:
    return db.get(UsedNonce, nonce) is not None


def record_nonce(db: Session, *, nonce: str, account_id: str, event_id: str, now: datetime) -> None:
    db.add(UsedNonce(nonce=nonce, account_id=account_id, event_id=event_id, used_at=now))
    db.flush()


def get_processed(db: Session, event_id: str) -> ProcessedEvent | None:
    return db.get(ProcessedEvent, event_id)


def record_processed(
    db: Session,
    *,
    event_id: str,
    lot_id: str,
    gate_id: str,
    seq: int,
    boot: int,
    reply_json: str,
    now: datetime,
) -> None:
    db.add(
        ProcessedEvent(
            event_id=event_id,
            lot_id=lot_id,
            gate_id=gate_id,
            seq=seq,
            boot=boot,
            reply_json=reply_json,
            processed_at=now,
        )
    )
    db.flush()


def record_dead_letter(
    db: Session, *, event_id: str | None, topic: str, payload: bytes, error: str, now: datetime
) -> None:
    db.add(DeadLetter(event_id=event_id, topic=topic, payload=payload, error=error, created_at=now))
    db.flush()


def require_session(db: Session, session_id: str) -> ParkingSession:
    parking = db.get(ParkingSession, session_id)
    if parking is None:
        raise NotFoundError(f"session {session_id!r} not found")
    return parking


def list_sessions(
    db: Session,
    *,
    lot_id: str | None = None,
    account_id: str | None = None,
    state: str | None = None,
    limit: int = 50,
) -> list[ParkingSession]:
    query = select(ParkingSession)
    if lot_id is not None:
        query = query.where(ParkingSession.lot_id == lot_id)
    if account_id is not None:
        query = query.where(ParkingSession.account_id == account_id)
    if state is not None:
        query = query.where(ParkingSession.state == state)
    query = query.order_by(col(ParkingSession.entered_at).desc()).limit(limit)
    return list(db.exec(query).all())


def session_read(parking: ParkingSession) -> SessionRead:
    items = [LineItemRead(**item) for item in json.loads(parking.quote_json or "[]")]
    duration = None
    if parking.exited_at is not None:
        duration = int((parking.exited_at - parking.entered_at).total_seconds())
    amount = None
    if parking.amount_minor is not None:
        amount = Money(amount_minor=parking.amount_minor, currency=parking.currency)
    return SessionRead(
        session_id=parking.session_id,
        account_id=parking.account_id,
        lot_id=parking.lot_id,
        state=parking.state,
        entry_gate_id=parking.entry_gate_id,
        entered_at=parking.entered_at,
        offline_entry=parking.offline_entry,
        exit_gate_id=parking.exit_gate_id,
        exited_at=parking.exited_at,
        offline_exit=parking.offline_exit,
        duration_s=duration,
        amount=amount,
        settlement=parking.settlement,
        line_items=items,
        tariff_version=parking.tariff_version,
        payment_method=parking.payment_method,
        prepaid_minor=parking.prepaid_minor,
        lost_ticket=parking.lost_ticket,
    )
