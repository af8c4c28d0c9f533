"""The scan-event use case: decide (or reconcile) one gate event inside a DB transaction.

Pure apart from the database session it is given: it takes the event, the topic it came
on, ``now`` and the public keys, and returns the reply to publish. The caller owns the
transaction (a SAVEPOINT per event inside a batch), so the event's effects and its
``processed_events`` row commit together or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlmodel import Session

from parking_protocol.messages import EventAck, GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.qr_token import CodeClaims, CodeRejected, verify_code
from parking_protocol.topics import TopicKind, TopicRef, gate_topic
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Money, Reason
from server.accounts import service as accounts
from server.gateways.service import get_gate
from server.lots.models import Lot
from server.lots.service import get_lot
from server.pricing.engine import quote
from server.sessions import service as sessions

__all__ = ["FlowConfig", "Reply", "handle_scan", "internal_error_reply", "unavailable_reply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    keys: Mapping[str, Ed25519PublicKey]
    skew: timedelta = timedelta(seconds=5)
    command_ttl: timedelta = timedelta(seconds=10)


@dataclass(frozen=True, slots=True)
class Reply:
    """A message to publish on a gate's commands topic once the transaction committed."""

    topic: str
    payload: bytes
    message: GateCommand | EventAck
    expiry: int | None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class _Decision:
    action: GateAction
    reason: Reason
    amount: Money | None = None
    session_id: str | None = None


def _deny(reason: Reason) -> _Decision:
    return _Decision(GateAction.DENY, reason)


def _display(decision: _Decision) -> str:
    if decision.reason == Reason.PAID and decision.amount and decision.amount.amount_minor:
        return f"Paid {decision.amount.display()} - thank you"
    return DENY_TEXT[decision.reason]


def _command(
    event: ScanEvent, ref: TopicRef, decision: _Decision, now: datetime, config: FlowConfig
) -> Reply:
    assert ref.gate_id is not None
    command = GateCommand(
        command_id=new_id(),
        event_id=event.event_id,
        lot_id=ref.lot_id,
        gate_id=ref.gate_id,
        action=decision.action,
        reason=decision.reason,
        display=_display(decision),
        amount=decision.amount,
        session_id=decision.session_id,
        issued_at=now,
        deadline=now + config.command_ttl,
    )
    return Reply(
        topic=gate_topic(ref.lot_id, ref.gate_id, TopicKind.COMMANDS),
        payload=encode(command),
        message=command,
        expiry=int(config.command_ttl.total_seconds()),
    )


def _ack(event: ScanEvent, ref: TopicRef, decision: _Decision) -> Reply:
    assert ref.gate_id is not None
    ack = EventAck(
        event_id=event.event_id,
        lot_id=ref.lot_id,
        gate_id=ref.gate_id,
        result=decision.reason,
        amount=decision.amount,
        session_id=decision.session_id,
    )
    return Reply(
        topic=gate_topic(ref.lot_id, ref.gate_id, TopicKind.COMMANDS),
        payload=encode(ack),
        message=ack,
        expiry=None,
    )


def internal_error_reply(
    event: ScanEvent, ref: TopicRef, *, now: datetime, config: FlowConfig
) -> Reply:
    """The deny sent for an event whose handling failed (it went to dead letters)."""
    return _command(event, ref, _deny(Reason.INTERNAL_ERROR), now, config)


def unavailable_reply(
    event: ScanEvent, ref: TopicRef, *, now: datetime, config: FlowConfig
) -> Reply:
    """The deny sent when the database could not commit a batch."""
    return _command(event, ref, _deny(Reason.SERVICE_UNAVAILABLE), now, config)


def handle_scan(
    db: Session, event: ScanEvent, ref: TopicRef, *, now: datetime, config: FlowConfig
) -> Reply:
    """Answer one scan event exactly once; a redelivered event gets its stored answer."""
    assert ref.gate_id is not None, "scan events arrive on per-gate topics"
    done = sessions.get_processed(db, event.event_id)
    if done is not None:
        stored = decode(done.reply_json)
        assert isinstance(stored, GateCommand | EventAck)
        return Reply(
            topic=gate_topic(done.lot_id, done.gate_id, TopicKind.COMMANDS),
            payload=done.reply_json.encode(),
            message=stored,
            expiry=None
            if isinstance(stored, EventAck)
            else int(config.command_ttl.total_seconds()),
            replayed=True,
        )
    if event.offline is not None:
        reply = _ack(event, ref, _reconcile(db, event, ref, config))
    else:
        reply = _command(event, ref, _decide(db, event, ref, now, config), now, config)
    sessions.record_processed(
        db,
        event_id=event.event_id,
        lot_id=ref.lot_id,
        gate_id=ref.gate_id,
        seq=event.seq,
        boot=event.boot,
        reply_json=reply.payload.decode(),
        now=now,
    )
    return reply


def _gate_check(db: Session, event: ScanEvent, ref: TopicRef) -> tuple[Lot, Direction] | Reason:
    if (event.lot_id, event.gate_id) != (ref.lot_id, ref.gate_id):
        return Reason.GATE_MISMATCH
    gate = get_gate(db, event.lot_id, event.gate_id)
    lot = get_lot(db, event.lot_id)
    if gate is None or lot is None:
        return Reason.GATE_UNKNOWN
    direction = Direction(gate.direction)
    if event.direction != direction:
        return Reason.GATE_MISMATCH
    return lot, direction


def _verify(event: ScanEvent, at: datetime, config: FlowConfig) -> CodeClaims | Reason:
    try:
        return verify_code(event.code, config.keys, now=at, skew=config.skew)
    except CodeRejected as exc:
        return Reason.from_rejection(exc.reason)


def _decide(
    db: Session, event: ScanEvent, ref: TopicRef, now: datetime, config: FlowConfig
) -> _Decision:
    checked = _gate_check(db, event, ref)
    if isinstance(checked, Reason):
        return _deny(checked)
    lot, direction = checked
    claims = _verify(event, now, config)  # never trust the gateway's own verification
    if isinstance(claims, Reason):
        return _deny(claims)
    if sessions.nonce_used(db, claims.nonce):
        return _deny(Reason.CODE_REPLAYED)
    account = accounts.get_account(db, claims.account_id)
    if account is None:
        return _deny(Reason.ACCOUNT_UNKNOWN)
    if account.blocked:
        return _deny(Reason.ACCOUNT_BLOCKED)
    current = sessions.find_open(db, account.account_id, lot.lot_id)

    if direction == Direction.ENTRY:
        if current is not None:
            return _deny(Reason.ALREADY_INSIDE)
        if sessions.count_open(db, lot.lot_id) >= lot.capacity:
            return _deny(Reason.LOT_FULL)
        parking = sessions.open_session(
            db,
            account_id=account.account_id,
            lot_id=lot.lot_id,
            gate_id=event.gate_id,
            event_id=event.event_id,
            entered_at=now,
            currency=lot.currency,
        )
        _burn(db, claims, event, now)
        return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=parking.session_id)

    if current is None:
        return _deny(Reason.NO_OPEN_SESSION)
    price = quote(lot.tariff(), current.entered_at, now)
    amount = price.amount
    settlement, transaction_id = "free", None
    if amount.amount_minor > 0:
        if account.currency != amount.currency or (
            accounts.balance(db, account.account_id, amount.currency) < amount.amount_minor
        ):
            return _Decision(GateAction.DENY, Reason.INSUFFICIENT_BALANCE, amount=amount)
        settlement = "paid"
        transaction_id = accounts.charge(
            db,
            account_id=account.account_id,
            lot_id=lot.lot_id,
            amount_minor=amount.amount_minor,
            currency=amount.currency,
            reference=f"session:{current.session_id}",
            now=now,
        )
    sessions.close_session(
        db,
        current,
        gate_id=event.gate_id,
        event_id=event.event_id,
        exited_at=now,
        quote=price,
        settlement=settlement,
        charge_transaction_id=transaction_id,
    )
    _burn(db, claims, event, now)
    return _Decision(GateAction.OPEN, Reason.PAID, amount=amount, session_id=current.session_id)


def _burn(db: Session, claims: CodeClaims, event: ScanEvent, now: datetime) -> None:
    """A code that opened a gate is spent; denied scans do not spend it."""
    sessions.record_nonce(
        db, nonce=claims.nonce, account_id=claims.account_id, event_id=event.event_id, now=now
    )


def _reconcile(db: Session, event: ScanEvent, ref: TopicRef, config: FlowConfig) -> _Decision:
    """Record what a gateway did on its own while offline; the gate already acted."""
    assert event.offline is not None
    offline = event.offline
    if offline.action == GateAction.DENY:
        return _Decision(GateAction.DENY, offline.reason)
    checked = _gate_check(db, event, ref)
    if isinstance(checked, Reason):
        log.warning("offline open at %s/%s not reconciled: %s", ref.lot_id, ref.gate_id, checked)
        return _deny(checked)
    lot, direction = checked
    at = event.scanned_at
    claims = _verify(event, at, config)  # validity judged when it was scanned, not now
    if isinstance(claims, Reason):
        log.warning("offline open with a bad code (%s) at %s/%s", claims, lot.lot_id, event.gate_id)
        return _deny(claims)
    if sessions.nonce_used(db, claims.nonce):
        log.warning("offline open with a replayed code at %s/%s", lot.lot_id, event.gate_id)
        return _deny(Reason.CODE_REPLAYED)
    account = accounts.get_account(db, claims.account_id)
    if account is None:
        return _deny(Reason.ACCOUNT_UNKNOWN)
    current = sessions.find_open(db, account.account_id, lot.lot_id)
    _burn(db, claims, event, at)

    if direction == Direction.ENTRY:
        if current is not None:
            return _deny(Reason.ALREADY_INSIDE)
        parking = sessions.open_session(
            db,
            account_id=account.account_id,
            lot_id=lot.lot_id,
            gate_id=event.gate_id,
            event_id=event.event_id,
            entered_at=at,
            currency=lot.currency,
            offline=True,
        )
        return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=parking.session_id)

    if current is None:
        log.warning("offline exit of %s with no open session in %s", account.account_id, lot.lot_id)
        return _deny(Reason.NO_OPEN_SESSION)
    price = quote(lot.tariff(), current.entered_at, at)
    amount = price.amount
    settlement, transaction_id = "free", None
    if amount.amount_minor > 0:
        available = accounts.balance(db, account.account_id, amount.currency)
        # The car is already out: charge anyway; a short wallet goes negative (a debt).
        settlement = "paid" if available >= amount.amount_minor else "owed"
        transaction_id = accounts.charge(
            db,
            account_id=account.account_id,
            lot_id=lot.lot_id,
            amount_minor=amount.amount_minor,
            currency=amount.currency,
            reference=f"session:{current.session_id}",
            now=at,
        )
    sessions.close_session(
        db,
        current,
        gate_id=event.gate_id,
        event_id=event.event_id,
        exited_at=at,
        quote=price,
        settlement=settlement,
        charge_transaction_id=transaction_id,
        offline=True,
    )
    reason = Reason.PAID if settlement != "owed" else Reason.INSUFFICIENT_BALANCE
    return _Decision(GateAction.OPEN, reason, amount=amount, session_id=current.session_id)
