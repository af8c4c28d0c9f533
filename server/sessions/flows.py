"""The scan-event use case: decide (or reconcile) one gate event inside a DB transaction.

Pure apart from the database session it is given: it takes the event, the topic it came
on, ``now`` and the public keys, and returns the reply to publish. The caller owns the
transaction (a SAVEPOINT per event inside a batch), so the event's effects and its
``processed_events`` row commit together or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlmodel import Session

from parking_protocol.messages import EventAck, GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.qr_token import CodeClaims, CodeRejected, verify_code
from parking_protocol.topics import TopicKind, TopicRef, gate_topic
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Money, Reason
from server.accounts import service as accounts
from server.accounts.models import Account
from server.gateways.service import get_gate
from server.lots.models import Lot
from server.lots.service import get_lot
from server.payments import service as payments
from server.payments.provider import PaymentProviders
from server.pricing import service as pricing
from server.pricing.adjust import StayPrice
from server.pricing.engine import lost_ticket_quote
from server.sessions import service as sessions
from server.sessions.models import ParkingSession

__all__ = ["FlowConfig", "Reply", "handle_scan", "internal_error_reply", "unavailable_reply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    keys: Mapping[str, Ed25519PublicKey]
    skew: timedelta = timedelta(seconds=5)
    command_ttl: timedelta = timedelta(seconds=10)
    payments: PaymentProviders = field(default_factory=PaymentProviders)


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
    display: str | None = None


def _deny(reason: Reason) -> _Decision:
    return _Decision(GateAction.DENY, reason)


def _display(decision: _Decision) -> str:
    if decision.display is not None:
        return decision.display
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

    decision = _exit(_Exit(db, event, lot, account, now, config, offline=False), current)
    if decision.action == GateAction.OPEN:
        _burn(db, claims, event, now)
    return decision


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

    return _exit(_Exit(db, event, lot, account, at, config, offline=True), current)


@dataclass(frozen=True, slots=True)
class _Exit:
    """One exit being decided (online, or reconciled after an offline open)."""

    db: Session
    event: ScanEvent
    lot: Lot
    account: Account
    at: datetime
    config: FlowConfig
    offline: bool


def _exit(exit_: _Exit, current: ParkingSession | None) -> _Decision:
    """Price and settle the stay; open, or deny with what is due and how to pay it.

    Offline the gate already opened, and a ``pay_later`` lot always opens: a payment that
    fails there turns the stay into a debt instead of a deny.
    """
    if current is None:
        return _lost_ticket(exit_)
    stay, version = payments.stay_price(exit_.db, exit_.lot, current, exit_.at)
    return _settle(exit_, current, stay, version.version)


def _lost_ticket(exit_: _Exit) -> _Decision:
    """An exit with no known entry pays the tariff's flat fee, if it has one."""
    db, lot, account = exit_.db, exit_.lot, exit_.account
    version = pricing.version_at(db, lot.lot_id, exit_.at)
    flat = lost_ticket_quote(pricing.tariff_of(version, lot.timezone))
    if flat is None:
        if exit_.offline:
            log.warning(
                "offline exit of %s with no open session in %s", account.account_id, lot.lot_id
            )
        return _deny(Reason.NO_OPEN_SESSION)
    parking = ParkingSession(
        session_id=new_id(),
        account_id=account.account_id,
        lot_id=lot.lot_id,
        state="open",
        entry_gate_id=exit_.event.gate_id,
        entry_event_id=exit_.event.event_id,
        entered_at=exit_.at,
        offline_entry=exit_.offline,
        currency=flat.amount.currency,
        lost_ticket=True,
    )
    return _settle(exit_, parking, StayPrice(flat, flat.amount.amount_minor), version.version)


def _settle(exit_: _Exit, parking: ParkingSession, stay: StayPrice, version: int) -> _Decision:
    due = stay.quote.amount.model_copy(update={"amount_minor": stay.due_minor})
    settled = payments.settle(
        exit_.db,
        exit_.config.payments,
        account=exit_.account,
        lot_id=exit_.lot.lot_id,
        session_id=parking.session_id,
        amount=due,
        key=f"exit:{parking.session_id}",
        now=exit_.at,
        allow_debt=exit_.offline or exit_.lot.payment_policy == "pay_later",
        check_replay=False,  # handle_scan answered redeliveries already
    )
    if settled.status in ("declined", "unavailable"):
        return _refused(settled, due)  # a lost-ticket session is never stored
    method = settled.method
    settlement: str = settled.status
    if settled.status == "free" and parking.prepaid_minor:
        method, settlement = parking.payment_method, "paid"
    sessions.close_session(
        exit_.db,
        parking,
        gate_id=exit_.event.gate_id,
        event_id=exit_.event.event_id,
        exited_at=exit_.at,
        quote=stay.quote,
        settlement=settlement,
        charge_transaction_id=settled.transaction_id,
        offline=exit_.offline,
        tariff_version=version,
        payment_method=method,
    )
    if settled.status == "owed":
        return _Decision(
            GateAction.OPEN,
            Reason.INSUFFICIENT_BALANCE,
            amount=due,
            session_id=parking.session_id,
            display=f"Unpaid {due.display()} - owed, top up in the app",
        )
    return _Decision(GateAction.OPEN, Reason.PAID, amount=due, session_id=parking.session_id)


def _refused(settled: payments.Settlement, due: Money) -> _Decision:
    """Deny an exit whose payment failed, saying what is due and what to do."""
    if settled.status == "unavailable":
        unconfirmed = f"Payment not confirmed: {due.display()} due - please scan again"
        return _Decision(
            GateAction.DENY, Reason.SERVICE_UNAVAILABLE, amount=due, display=unconfirmed
        )
    declined = None  # a short wallet: the standard text says why and how to top up
    if settled.method == "card":
        declined = f"Card declined: {due.display()} due - top up or change card in the app"
    return _Decision(GateAction.DENY, Reason.INSUFFICIENT_BALANCE, amount=due, display=declined)
