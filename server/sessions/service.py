"""Data access for parking sessions, code nonces, processed events, dead letters, pending
offline scans and reconciliation flags."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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
    PendingScan,
    ProcessedEvent,
    ReconcileFlag,
    SessionRead,
    SessionState,
    UsedNonce,
    state_in,
)

__all__ = [
    "add_flag",
    "close_session",
    "count_open",
    "earliest_pending",
    "find_open",
    "get_pending",
    "get_processed",
    "latest_pending",
    "list_flags",
    "list_pending",
    "list_sessions",
    "lost_ticket_exit_after",
    "nonce_used",
    "open_session",
    "processed_by_command",
    "record_dead_letter",
    "record_nonce",
    "record_pending",
    "record_processed",
    "release_nonce",
    "reopen_session",
    "replace_reply",
    "require_session",
    "session_read",
    "settle_pending",
    "stay_entered_by",
    "unsettle_pending",
]


def find_open(db: Session, account_id: str, lot_id: str) -> ParkingSession | None:
    return db.exec(
        select(ParkingSession).where(
            ParkingSession.account_id == account_id,
            ParkingSession.lot_id == lot_id,
            state_in(SessionState.OPEN),
        )
    ).first()


def stay_entered_by(
    db: Session, account_id: str, lot_id: str, at: datetime
) -> ParkingSession | None:
    """The stay, open or closed, whose entry is the latest at or before ``at`` (a voided
    entry or a lost-ticket exit, whose "entry" is its exit, is no entry)."""
    found: ParkingSession | None = db.exec(
        select(ParkingSession)
        .where(
            ParkingSession.account_id == account_id,
            ParkingSession.lot_id == lot_id,
            state_in(SessionState.OPEN, SessionState.CLOSED),
            col(ParkingSession.lost_ticket).is_(False),
            ParkingSession.entered_at <= at,
        )
        .order_by(col(ParkingSession.entered_at).desc(), col(ParkingSession.session_id).desc())
    ).first()
    return found


def count_open(db: Session, lot_id: str) -> int:
    total = db.exec(
        select(sa.func.count())
        .select_from(ParkingSession)
        .where(ParkingSession.lot_id == lot_id, state_in(SessionState.OPEN))
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
    parking.quote_json = quote.line_items_json()
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
    command_id: str | None = None,
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
            command_id=command_id,
        )
    )
    db.flush()


def processed_by_command(db: Session, command_id: str) -> ProcessedEvent | None:
    """The scan that ``command_id`` answered, if it answered one."""
    return db.exec(select(ProcessedEvent).where(ProcessedEvent.command_id == command_id)).first()


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


def replace_reply(db: Session, done: ProcessedEvent, reply_json: str) -> None:
    """An event reconciled again (the gate did otherwise): its stored answer changes."""
    done.reply_json = reply_json
    db.add(done)
    db.flush()


def release_nonce(db: Session, event_id: str) -> None:
    """The scan ``event_id`` did not open its gate after all: its code is not spent."""
    for used in db.exec(select(UsedNonce).where(UsedNonce.event_id == event_id)).all():
        db.delete(used)
    db.flush()


def reopen_session(db: Session, parking: ParkingSession) -> ParkingSession:
    """Undo an exit the gate did not carry out: the stay is open again."""
    parking.state = SessionState.OPEN
    parking.exit_gate_id = None
    parking.exit_event_id = None
    parking.exited_at = None
    parking.offline_exit = False
    parking.amount_minor = None
    parking.settlement = None
    parking.charge_transaction_id = None
    parking.tariff_version = None
    parking.payment_method = None
    parking.quote_json = None
    db.add(parking)
    db.flush()
    return parking


def record_pending(
    db: Session,
    *,
    event_id: str,
    account_id: str,
    lot_id: str,
    gate_id: str,
    direction: str,
    at: datetime,
    now: datetime,
) -> PendingScan:
    pending = PendingScan(
        event_id=event_id,
        account_id=account_id,
        lot_id=lot_id,
        gate_id=gate_id,
        direction=direction,
        at=at,
        created_at=now,
    )
    db.add(pending)
    db.flush()
    return pending


def _unsettled(account_id: str, lot_id: str, direction: str) -> Any:
    return select(PendingScan).where(
        PendingScan.account_id == account_id,
        PendingScan.lot_id == lot_id,
        PendingScan.direction == direction,
        col(PendingScan.session_id).is_(None),
    )


def earliest_pending(
    db: Session, account_id: str, lot_id: str, direction: str, *, not_before: datetime
) -> PendingScan | None:
    """The first unsettled pending scan at or after ``not_before``."""
    query = _unsettled(account_id, lot_id, direction).where(PendingScan.at >= not_before)
    found: PendingScan | None = db.exec(
        query.order_by(col(PendingScan.at), col(PendingScan.event_id))
    ).first()
    return found


def latest_pending(
    db: Session,
    account_id: str,
    lot_id: str,
    direction: str,
    *,
    not_after: datetime,
    not_before: datetime | None = None,
) -> PendingScan | None:
    """The last unsettled pending scan at or before ``not_after`` (and after ``not_before``)."""
    query = _unsettled(account_id, lot_id, direction).where(PendingScan.at <= not_after)
    if not_before is not None:
        query = query.where(PendingScan.at >= not_before)
    found: PendingScan | None = db.exec(
        query.order_by(col(PendingScan.at).desc(), col(PendingScan.event_id).desc())
    ).first()
    return found


def settle_pending(db: Session, pending: PendingScan, session_id: str, now: datetime) -> None:
    pending.session_id = session_id
    pending.settled_at = now
    db.add(pending)
    db.flush()


def unsettle_pending(db: Session, pending: PendingScan) -> None:
    """The stay ``pending`` was settled by turned out not to be its own: it waits again."""
    pending.session_id = None
    pending.settled_at = None
    db.add(pending)
    db.flush()


def get_pending(db: Session, event_id: str) -> PendingScan | None:
    return db.get(PendingScan, event_id)


def list_pending(db: Session, *, lot_id: str | None = None) -> list[PendingScan]:
    query = select(PendingScan).where(col(PendingScan.session_id).is_(None))
    if lot_id is not None:
        query = query.where(PendingScan.lot_id == lot_id)
    return list(db.exec(query.order_by(col(PendingScan.at))).all())


def add_flag(
    db: Session,
    *,
    event_id: str,
    lot_id: str,
    gate_id: str,
    account_id: str | None,
    kind: str,
    detail: str,
    now: datetime,
) -> None:
    """Record a finding for an operator, once per event and kind."""
    existing = db.exec(
        select(ReconcileFlag).where(ReconcileFlag.event_id == event_id, ReconcileFlag.kind == kind)
    ).first()
    if existing is not None:
        return
    db.add(
        ReconcileFlag(
            event_id=event_id,
            lot_id=lot_id,
            gate_id=gate_id,
            account_id=account_id,
            kind=kind,
            detail=detail[:2000],
            created_at=now,
        )
    )
    db.flush()


def list_flags(db: Session, *, lot_id: str | None = None) -> list[ReconcileFlag]:
    query = select(ReconcileFlag)
    if lot_id is not None:
        query = query.where(ReconcileFlag.lot_id == lot_id)
    return list(db.exec(query.order_by(col(ReconcileFlag.flag_id))).all())


def lost_ticket_exit_after(
    db: Session, account_id: str, lot_id: str, at: datetime
) -> ParkingSession | None:
    """The first lost-ticket exit at or after ``at`` that no late entry has claimed yet."""
    claimed = select(PendingScan.session_id).where(col(PendingScan.session_id).is_not(None))
    found: ParkingSession | None = db.exec(
        select(ParkingSession)
        .where(
            ParkingSession.account_id == account_id,
            ParkingSession.lot_id == lot_id,
            state_in(SessionState.CLOSED),
            col(ParkingSession.lost_ticket).is_(True),
            col(ParkingSession.exited_at) >= at,
            col(ParkingSession.session_id).not_in(claimed),
        )
        .order_by(col(ParkingSession.exited_at))
    ).first()
    return found
