"""The scan-event use case: decide (or reconcile) one gate event inside a DB transaction.

Pure apart from the database session it is given: it takes the event, the topic it came
on, ``now`` and the public keys, and returns the reply to publish. The caller owns the
transaction (a SAVEPOINT per event inside a batch), so the event's effects and its
``processed_events`` row commit together or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlmodel import Session, select

from parking_protocol.messages import (
    CommandOutcome,
    CommandReply,
    EventAck,
    GateCommand,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import CodeClaims, CodeRejected, verify_code
from parking_protocol.topics import TopicKind, TopicRef, gate_topic
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Money, Reason
from server.accounts import service as accounts
from server.accounts.models import Account
from server.gateways.service import get_gate
from server.lots.models import Lot
from server.lots.service import get_lot
from server.payments import service as payments
from server.payments.models import Payment, RefundCreate
from server.payments.provider import PaymentProviders
from server.pricing import service as pricing
from server.pricing.adjust import StayPrice
from server.pricing.engine import LineItem, Quote, lost_ticket_quote
from server.sessions import service as sessions
from server.sessions.models import ParkingSession, PendingScan, SessionState
from server.signatures import SignatureChecker

__all__ = [
    "FlowConfig",
    "Reply",
    "command_not_executed",
    "event_time",
    "handle_scan",
    "internal_error_reply",
    "unavailable_reply",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """``max_event_age``: how old an online event's ``scanned_at`` may be and still be the
    time its code is judged at and its stay dated by (see :func:`event_time`): the longest
    code lifetime the protocol allows (10 min) plus five minutes of delivery delay."""

    keys: Mapping[str, Ed25519PublicKey]
    skew: timedelta = timedelta(seconds=5)
    command_ttl: timedelta = timedelta(seconds=10)
    payments: PaymentProviders = field(default_factory=PaymentProviders)
    max_event_age: timedelta = timedelta(minutes=15)
    signatures: SignatureChecker | None = None
    """Checks the codes' signatures ahead, as events arrive (the bridge submits them)."""


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
    return _command_for(event.event_id, ref, decision, now, config)


def _command_for(
    event_id: str, ref: TopicRef, decision: _Decision, now: datetime, config: FlowConfig
) -> Reply:
    assert ref.gate_id is not None
    # Every field is the service's own, already typed: built without validating it again
    # (7 % of a busy service's database thread; a test checks it equals the validated one).
    command = GateCommand.model_construct(
        command_id=new_id(),
        event_id=event_id,
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
    """Answer one scan event exactly once; a redelivered event gets its stored answer,
    unless it now says the gate did otherwise on its own: then the stay is reconciled."""
    assert ref.gate_id is not None, "scan events arrive on per-gate topics"
    done = sessions.get_processed(db, event.event_id)
    if done is not None:
        stored = decode(done.reply_json)
        assert isinstance(stored, GateCommand | EventAck)
        if (
            event.offline is not None
            and isinstance(stored, GateCommand)
            and stored.action != event.offline.action
        ):
            # The answer came too late: the gate had already decided otherwise.
            reply = _ack(event, ref, _redress(db, event, ref, stored, now=now, config=config))
            sessions.replace_reply(db, done, reply.payload.decode())
            return reply
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
        reply = _ack(event, ref, _reconcile(db, event, ref, now, config))
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
        command_id=reply.message.command_id if isinstance(reply.message, GateCommand) else None,
    )
    return reply


def command_not_executed(
    db: Session, reply: CommandReply, *, now: datetime, config: FlowConfig
) -> bool:
    """A gate says it let an "open" for a scan expire unexecuted (say it lost power before
    the command arrived, and saw it only after its deadline): the barrier never opened, so
    the entry or the exit it answered is undone — no stay for a car that never came in, no
    charge for one still inside — and a later redelivery of that scan gets a deny asking
    the driver to scan again. Returns whether anything was undone."""
    if reply.outcome is not CommandOutcome.EXPIRED:
        return False
    done = sessions.processed_by_command(db, reply.command_id)
    if done is None or (done.lot_id, done.gate_id) != (reply.lot_id, reply.gate_id):
        return False
    stored = decode(done.reply_json)
    if not isinstance(stored, GateCommand) or stored.action is not GateAction.OPEN:
        return False
    gate = get_gate(db, done.lot_id, done.gate_id)
    if gate is None:
        return False
    _undo_open(
        db,
        _Scan(done.event_id, done.lot_id, done.gate_id, Direction(gate.direction)),
        stored,
        now,
        config,
    )
    ref = TopicRef(kind=TopicKind.EVENTS, lot_id=done.lot_id, gate_id=done.gate_id)
    retry = _Decision(
        GateAction.DENY,
        Reason.SERVICE_UNAVAILABLE,
        display="Not opened in time - please scan again",
    )
    again = _command_for(done.event_id, ref, retry, now, config)
    sessions.replace_reply(db, done, again.payload.decode())
    done.command_id = again.message.command_id if isinstance(again.message, GateCommand) else None
    db.add(done)
    db.flush()
    log.warning(
        "gate %s/%s let command %s expire unexecuted: scan %s undone",
        done.lot_id,
        done.gate_id,
        reply.command_id,
        done.event_id,
    )
    return True


def event_time(event: ScanEvent, now: datetime, config: FlowConfig) -> datetime:
    """When an online scan happened: its ``scanned_at`` if plausible, else ``now``.

    Plausible means not ahead of ``now`` by more than the clock skew and not older than
    ``config.max_event_age``. A delayed event (the service restarting, a slow broker) is
    then judged as the gate saw it: a code valid when scanned is not refused as expired
    minutes later. Signature and single use are checked whatever the time.
    """
    at = event.scanned_at
    if now - config.max_event_age <= at <= now + config.skew:
        return min(at, now)
    return now


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
        proven = config.signatures.proven if config.signatures is not None else None
        return verify_code(event.code, config.keys, now=at, skew=config.skew, proven=proven)
    except CodeRejected as exc:
        return Reason.from_rejection(exc.reason)


def _decide(
    db: Session, event: ScanEvent, ref: TopicRef, now: datetime, config: FlowConfig
) -> _Decision:
    checked = _gate_check(db, event, ref)
    if isinstance(checked, Reason):
        return _deny(checked)
    lot, direction = checked
    at = event_time(event, now, config)
    claims = _verify(event, at, config)  # never trust the gateway's own verification
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
        entry = _Entry(db, lot, account, at, now, config, event.gate_id, event.event_id, False)
        left = _pending_exit(entry)
        if left is None:
            if current is not None:
                return _deny(Reason.ALREADY_INSIDE)
            if sessions.count_open(db, lot.lot_id) >= lot.capacity:
                return _deny(Reason.LOT_FULL)
        decision = _enter(entry, left)
        _burn(db, claims, event, at)
        return decision

    exit_ = _Exit(db, lot, account, at, now, config, event.gate_id, event.event_id, False)
    decision = _exit(exit_)
    if decision.action == GateAction.OPEN:
        _burn(db, claims, event, at)
    return decision


def _burn(db: Session, claims: CodeClaims, event: ScanEvent, at: datetime) -> None:
    """A code that opened a gate is spent; denied scans do not spend it."""
    sessions.record_nonce(
        db, nonce=claims.nonce, account_id=claims.account_id, event_id=event.event_id, now=at
    )


def _flag(
    db: Session, event: ScanEvent, account_id: str | None, *, kind: str, detail: str, now: datetime
) -> None:
    log.warning(
        "reconcile %s at %s/%s (%s): %s", kind, event.lot_id, event.gate_id, account_id, detail
    )
    sessions.add_flag(
        db,
        event_id=event.event_id,
        lot_id=event.lot_id,
        gate_id=event.gate_id,
        account_id=account_id,
        kind=kind,
        detail=detail,
        now=now,
    )


def _reconcile(
    db: Session, event: ScanEvent, ref: TopicRef, now: datetime, config: FlowConfig
) -> _Decision:
    """Record what a gateway did on its own while offline; the gate already acted."""
    assert event.offline is not None
    offline = event.offline
    if offline.action == GateAction.DENY:
        return _Decision(GateAction.DENY, offline.reason)
    checked = _gate_check(db, event, ref)
    if isinstance(checked, Reason):
        _flag(
            db,
            event,
            None,
            kind="offline_open_unreconciled",
            detail=f"gate check: {checked}",
            now=now,
        )
        return _deny(checked)
    lot, direction = checked
    # Validity is judged when the code was scanned, not now; a gateway clock ahead of ours
    # dates nothing in the future.
    claims = _verify(event, event.scanned_at, config)
    at = min(event.scanned_at, now)
    if isinstance(claims, Reason):
        _flag(
            db,
            event,
            None,
            kind="offline_open_bad_code",
            detail=f"the gate opened for {claims}",
            now=now,
        )
        return _deny(claims)
    if sessions.nonce_used(db, claims.nonce):
        # One code opened two gates (or one twice) while they were offline: recorded once,
        # never a second session or charge.
        _flag(
            db,
            event,
            claims.account_id,
            kind="code_reused",
            detail="a spent code opened the gate",
            now=now,
        )
        return _deny(Reason.CODE_REPLAYED)
    account = accounts.get_account(db, claims.account_id)
    if account is None:
        _flag(
            db,
            event,
            claims.account_id,
            kind="offline_open_unknown_account",
            detail="no account",
            now=now,
        )
        return _deny(Reason.ACCOUNT_UNKNOWN)
    current = sessions.find_open(db, account.account_id, lot.lot_id)
    _burn(db, claims, event, at)

    if direction == Direction.ENTRY:
        entry = _Entry(db, lot, account, at, now, config, event.gate_id, event.event_id, True)
        left = _pending_exit(entry)
        paid_as_lost = sessions.lost_ticket_exit_after(db, account.account_id, lot.lot_id, at)
        if paid_as_lost is not None and (
            left is None or paid_as_lost.exited_at is None or paid_as_lost.exited_at <= left.at
        ):
            # The car already left, online, paying the lost-ticket fee: this is that stay's
            # entry. Claimed (so it is matched once) and flagged; no second stay or charge.
            claimed = _pend(
                db, account=account, lot=lot, event=event, direction=Direction.ENTRY, at=at, now=now
            )
            sessions.settle_pending(db, claimed, paid_as_lost.session_id, now)
            detail = f"entry of lost-ticket stay {paid_as_lost.session_id}"
            _flag(
                db,
                event,
                account.account_id,
                kind="entry_after_lost_ticket",
                detail=detail,
                now=now,
            )
            return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=paid_as_lost.session_id)
        if left is None and current is not None:
            # Still inside as far as we know: the exit of that stay has not arrived yet.
            # This entry waits for it (see _admit_pending_entry).
            _pend(
                entry.db,
                account=account,
                lot=lot,
                event=event,
                direction=Direction.ENTRY,
                at=at,
                now=now,
            )
            return _deny(Reason.ALREADY_INSIDE)
        return _enter(entry, left)

    exit_ = _Exit(db, lot, account, at, now, config, event.gate_id, event.event_id, True)
    return _exit(exit_)


def _pend(
    db: Session,
    *,
    account: Account,
    lot: Lot,
    event: ScanEvent,
    direction: Direction,
    at: datetime,
    now: datetime,
) -> PendingScan:
    log.info(
        "offline %s of %s in %s at %s kept pending", direction, account.account_id, lot.lot_id, at
    )
    return sessions.record_pending(
        db,
        event_id=event.event_id,
        account_id=account.account_id,
        lot_id=lot.lot_id,
        gate_id=event.gate_id,
        direction=direction.value,
        at=at,
        now=now,
    )


def _redress(
    db: Session,
    event: ScanEvent,
    ref: TopicRef,
    stored: GateCommand,
    *,
    now: datetime,
    config: FlowConfig,
) -> _Decision:
    """The service answered too late and the gate acted otherwise: follow the gate."""
    assert event.offline is not None
    if event.offline.action == GateAction.OPEN:
        # Denied here, but the barrier opened: the deny changed nothing, so reconcile the
        # event as the offline open it was.
        return _reconcile(db, event, ref, now, config)
    return _void(db, event, stored, now, config)


def _void(
    db: Session, event: ScanEvent, stored: GateCommand, now: datetime, config: FlowConfig
) -> _Decision:
    """Opened here, but the barrier stayed shut: undo the entry or the exit."""
    assert event.offline is not None
    scan = _Scan(event.event_id, event.lot_id, event.gate_id, event.direction)
    _undo_open(db, scan, stored, now, config)
    return _Decision(GateAction.DENY, event.offline.reason)


@dataclass(frozen=True, slots=True)
class _Scan:
    """What undoing an opened scan needs to know of it."""

    event_id: str
    lot_id: str
    gate_id: str
    direction: Direction


def _undo_flag(
    db: Session, scan: _Scan, account_id: str | None, detail: str, now: datetime
) -> None:
    log.warning("void failed at %s/%s (%s): %s", scan.lot_id, scan.gate_id, account_id, detail)
    sessions.add_flag(
        db,
        event_id=scan.event_id,
        lot_id=scan.lot_id,
        gate_id=scan.gate_id,
        account_id=account_id,
        kind="void_failed",
        detail=detail,
        now=now,
    )


def _undo_open(
    db: Session, scan: _Scan, stored: GateCommand, now: datetime, config: FlowConfig
) -> None:
    """The "open" answering ``scan`` was not carried out: undo its entry or its exit."""
    parking = db.get(ParkingSession, stored.session_id) if stored.session_id else None
    if parking is None:
        _undo_flag(db, scan, None, "the opened stay is not known", now)
        return
    account = accounts.get_account(db, parking.account_id)
    if scan.direction == Direction.ENTRY:
        if parking.state == SessionState.OPEN and parking.entry_event_id == scan.event_id:
            parking.state = SessionState.VOID
            db.add(parking)
            db.flush()
            sessions.release_nonce(db, scan.event_id)
            return
        _undo_flag(db, scan, parking.account_id, f"entry stay {parking.state}", now)
        return
    reopenable = (
        parking.state == SessionState.CLOSED
        and parking.exit_event_id == scan.event_id
        and parking.settlement in ("free", "paid")
        and account is not None
        and sessions.find_open(db, parking.account_id, parking.lot_id) is None
    )
    if not reopenable:
        detail = f"exit stay {parking.state}, settlement {parking.settlement}"
        _undo_flag(db, scan, parking.account_id, detail, now)
        return
    if _refundable(db, parking.session_id) > 0:  # a stay re-paired cheaper may be refunded
        payments.refund_session(
            db,
            config.payments,
            parking=parking,
            data=RefundCreate(reason="the exit barrier stayed shut", actor="reconcile"),
            key=f"void:{scan.event_id}",
            now=now,
        )
    sessions.release_nonce(db, scan.event_id)
    if parking.lost_ticket:
        parking.state = SessionState.VOID
        db.add(parking)
        db.flush()
    else:
        sessions.reopen_session(db, parking)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One entry being recorded (online, or reconciled after an offline open)."""

    db: Session
    lot: Lot
    account: Account
    at: datetime
    now: datetime
    config: FlowConfig
    gate_id: str
    event_id: str
    offline: bool


@dataclass(frozen=True, slots=True)
class _Exit:
    """One exit being decided (online, or reconciled after an offline open). ``opened``:
    the barrier opened for it long ago (an exit moved to another stay), so it never waits
    for a payment and never becomes a lost ticket."""

    db: Session
    lot: Lot
    account: Account
    at: datetime
    now: datetime
    config: FlowConfig
    gate_id: str
    event_id: str
    offline: bool
    opened: bool = False

    @property
    def must_open(self) -> bool:
        return self.offline or self.opened


def _pending_exit(entry: _Entry) -> PendingScan | None:
    """An offline exit already reconciled without a stay, that this entry began."""
    return sessions.earliest_pending(
        entry.db,
        entry.account.account_id,
        entry.lot.lot_id,
        Direction.EXIT.value,
        not_before=entry.at,
    )


def _new_session(entry: _Entry) -> ParkingSession:
    return ParkingSession(
        session_id=new_id(),
        account_id=entry.account.account_id,
        lot_id=entry.lot.lot_id,
        state=SessionState.OPEN,
        entry_gate_id=entry.gate_id,
        entry_event_id=entry.event_id,
        entered_at=entry.at,
        offline_entry=entry.offline,
        currency=entry.lot.currency,
    )


def _enter(entry: _Entry, left: PendingScan | None) -> _Decision:
    """Open the stay; if its offline exit is already known, close it at once and charge it
    (as a debt if short: that barrier opened long ago)."""
    if left is None:
        parking = sessions.open_session(
            entry.db,
            account_id=entry.account.account_id,
            lot_id=entry.lot.lot_id,
            gate_id=entry.gate_id,
            event_id=entry.event_id,
            entered_at=entry.at,
            currency=entry.lot.currency,
            offline=entry.offline,
        )
        return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=parking.session_id)
    parking = _new_session(entry)  # never stored open: it is already over
    exit_ = _Exit(
        entry.db,
        entry.lot,
        entry.account,
        left.at,
        entry.now,
        entry.config,
        left.gate_id,
        left.event_id,
        True,
    )
    stay, version = payments.stay_price(entry.db, entry.lot, parking, left.at)
    _settle(exit_, parking, stay, version.version)
    sessions.settle_pending(entry.db, left, parking.session_id, entry.now)
    log.info("offline exit %s settled by its entry %s", left.event_id, entry.event_id)
    return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=parking.session_id)


def _exit(exit_: _Exit) -> _Decision:
    """Find the stay this exit ends, price and settle it; open, or deny with what is due.

    The stay is the one whose entry is the latest at or before the exit's scan time: the
    open session, an offline entry still pending, or a stay that a later exit, arrived
    first, already closed (this exit ends it instead: see :func:`_repair`). An exit with no
    entry before it waits for one if its gate opened; an online one ends the open session
    if there is one (a gateway clock slightly behind), else pays a lost-ticket fee.
    Offline the gate already opened, and a ``pay_later`` lot always opens: a payment that
    fails there turns the stay into a debt instead of a deny.
    """
    db, account, lot = exit_.db, exit_.account, exit_.lot
    stay = sessions.stay_entered_by(db, account.account_id, lot.lot_id, exit_.at)
    waiting = sessions.latest_pending(
        db,
        account.account_id,
        lot.lot_id,
        Direction.ENTRY.value,
        not_after=exit_.at,
        not_before=stay.entered_at if stay is not None else None,
    )
    if waiting is not None:
        return _exit_pending_entry(exit_, waiting)
    if stay is not None and stay.state == SessionState.OPEN:
        return _close(exit_, stay)
    if stay is not None and stay.exited_at is not None and stay.exited_at > exit_.at:
        return _repair(exit_, stay)
    if exit_.must_open:
        # The gate opened before its entry reached us: the entry settles it when it comes.
        _pend_exit(exit_)
        log.info("offline exit of %s in %s kept pending", account.account_id, lot.lot_id)
        return _deny(Reason.NO_OPEN_SESSION)
    current = sessions.find_open(db, account.account_id, lot.lot_id)
    if current is not None and current.entered_at - exit_.at <= exit_.config.skew:
        # Scanned just before the open stay began: a gateway clock slightly behind.
        return _close(replace(exit_, at=max(exit_.at, current.entered_at)), current)
    if current is not None:
        # Scanned well before the open stay began (a live exit delivered late, after a
        # partition): not that stay's exit. If its barrier opened offline, the lane sends it
        # again with that decision and it waits for its own entry.
        log.info("exit %s predates the open stay of %s: denied", exit_.event_id, account.account_id)
        return _deny(Reason.NO_OPEN_SESSION)
    return _lost_ticket(exit_)


def _close(exit_: _Exit, current: ParkingSession) -> _Decision:
    """The exit ends the open session: price and settle it; a waiting entry may begin."""
    stay, version = payments.stay_price(exit_.db, exit_.lot, current, exit_.at)
    decision = _settle(exit_, current, stay, version.version)
    if current.state == SessionState.CLOSED:
        _admit_pending_entry(exit_)
    return decision


def _repair(exit_: _Exit, stay: ParkingSession) -> _Decision:
    """The exit falls inside a stay a later exit already closed: it is that stay's exit
    (the first one after its entry), and the later exit ends the next stay, found the same
    way — or waits for its entry. Stays only ever close here, none is reopened."""
    assert stay.exited_at is not None
    assert stay.exit_gate_id is not None
    assert stay.exit_event_id is not None
    freed = _Exit(
        exit_.db,
        exit_.lot,
        exit_.account,
        stay.exited_at,
        exit_.now,
        exit_.config,
        stay.exit_gate_id,
        stay.exit_event_id,
        stay.offline_exit,
        opened=True,
    )
    log.warning(
        "exit %s of %s in %s ends stay %s, closed by the later exit %s: re-paired",
        exit_.event_id,
        exit_.account.account_id,
        exit_.lot.lot_id,
        stay.session_id,
        freed.event_id,
    )
    decision = _move_exit(exit_, stay)
    moved = _exit(freed)
    if moved.action != GateAction.OPEN:
        _pend_exit(freed)
    _repoint(freed, stay.session_id, moved.session_id if moved.action == GateAction.OPEN else None)
    return decision


def _move_exit(exit_: _Exit, stay: ParkingSession) -> _Decision:
    """``stay`` ends at ``exit_`` now, priced at its own times; what it was charged above
    that is refunded. What cannot be (a debt, a failed refund) stays charged, shown as a
    line of its own, and is flagged for an operator."""
    db = exit_.db
    charged = stay.amount_minor or 0
    price, version = payments.stay_price(db, exit_.lot, stay, exit_.at)
    quote = price.quote
    over = charged - quote.amount.amount_minor
    kept = over - _refund_part(exit_, stay, over) if over > 0 else over
    if kept:
        detail = (
            f"stay {stay.session_id} re-paired with exit {exit_.event_id}: it costs"
            f" {quote.amount.amount_minor} at its own times, {charged} was charged, {kept}"
            " of the difference is left as charged"
        )
        _flag_exit(exit_, kind="re_paired_charge_kept", detail=detail)
        quote = Quote(
            quote.amount.model_copy(update={"amount_minor": quote.amount.amount_minor + kept}),
            quote.duration,
            (*quote.line_items, LineItem("As charged before its exit was corrected", 1, kept)),
        )
    settlement = stay.settlement or "free"
    sessions.close_session(
        db,
        stay,
        gate_id=exit_.gate_id,
        event_id=exit_.event_id,
        exited_at=exit_.at,
        quote=quote,
        settlement=settlement,
        charge_transaction_id=stay.charge_transaction_id,
        offline=exit_.offline,
        tariff_version=version.version,
        payment_method=stay.payment_method,
    )
    if settlement == "owed":
        return _Decision(
            GateAction.OPEN,
            Reason.INSUFFICIENT_BALANCE,
            amount=quote.amount,
            session_id=stay.session_id,
            display=f"Unpaid {quote.amount.display()} - owed, top up in the app",
        )
    return _Decision(GateAction.OPEN, Reason.PAID, amount=quote.amount, session_id=stay.session_id)


def _refundable(db: Session, session_id: str) -> int:
    """What of a stay's captured payments has not been refunded yet."""
    paid = [p for p in payments.session_payments(db, session_id) if p.status == "captured"]
    done = payments.refunded_minor(db, [p.payment_id for p in paid])
    return sum(p.amount_minor - done.get(p.payment_id, 0) for p in paid)


def _refund_part(exit_: _Exit, stay: ParkingSession, wanted: int) -> int:
    """Refund up to ``wanted`` of what ``stay`` was paid; returns what was refunded."""
    db = exit_.db
    before = _refundable(db, stay.session_id)
    part = min(wanted, before)
    if part <= 0:
        return 0
    try:
        payments.refund_session(
            db,
            exit_.config.payments,
            parking=stay,
            data=RefundCreate(
                amount_minor=part, reason="the stay ended at an earlier exit", actor="reconcile"
            ),
            key=f"pair:{exit_.event_id}",  # short: the wallet's refund ref holds 100 chars
            now=exit_.now,
        )
    except payments.PaymentUnavailable as exc:
        log.warning("refund of re-paired stay %s not confirmed: %s", stay.session_id, exc)
    return before - _refundable(db, stay.session_id)


def _flag_exit(exit_: _Exit, *, kind: str, detail: str) -> None:
    log.warning("%s at %s/%s: %s", kind, exit_.lot.lot_id, exit_.gate_id, detail)
    sessions.add_flag(
        exit_.db,
        event_id=exit_.event_id,
        lot_id=exit_.lot.lot_id,
        gate_id=exit_.gate_id,
        account_id=exit_.account.account_id,
        kind=kind,
        detail=detail,
        now=exit_.now,
    )


def _pend_exit(exit_: _Exit) -> None:
    """An exit whose gate opened waits for its entry (again, if it had been settled)."""
    known = sessions.get_pending(exit_.db, exit_.event_id)
    if known is None:
        sessions.record_pending(
            exit_.db,
            event_id=exit_.event_id,
            account_id=exit_.account.account_id,
            lot_id=exit_.lot.lot_id,
            gate_id=exit_.gate_id,
            direction=Direction.EXIT.value,
            at=exit_.at,
            now=exit_.now,
        )
    elif known.session_id is not None:
        sessions.unsettle_pending(exit_.db, known)


def _repoint(moved: _Exit, old: str, new: str | None) -> None:
    """An exit moved from stay ``old`` to ``new`` (None: it waits for its entry): its
    stored answer and its pending scan name that stay, so undoing it later finds it."""
    db = moved.db
    done = sessions.get_processed(db, moved.event_id)
    if done is not None:
        stored = decode(done.reply_json)
        if isinstance(stored, GateCommand | EventAck) and stored.session_id == old:
            again = stored.model_copy(update={"session_id": new})
            sessions.replace_reply(db, done, encode(again).decode())
    known = sessions.get_pending(db, moved.event_id)
    if known is not None and new is not None:
        sessions.settle_pending(db, known, new, moved.now)


def _exit_pending_entry(exit_: _Exit, pending: PendingScan) -> _Decision:
    """The exit ends a stay that began with an offline entry still pending."""
    entry = _Entry(
        exit_.db,
        exit_.lot,
        exit_.account,
        pending.at,
        exit_.now,
        exit_.config,
        pending.gate_id,
        pending.event_id,
        True,
    )
    parking = _new_session(entry)
    stay, version = payments.stay_price(exit_.db, exit_.lot, parking, exit_.at)
    decision = _settle(exit_, parking, stay, version.version)
    if parking.state == SessionState.CLOSED:
        sessions.settle_pending(exit_.db, pending, parking.session_id, exit_.now)
    return decision


def _admit_pending_entry(closed: _Exit) -> None:
    """A stay just closed: an offline entry that was waiting for it now begins its own."""
    db, account, lot = closed.db, closed.account, closed.lot
    at = closed.at
    while True:
        pending = sessions.earliest_pending(
            db, account.account_id, lot.lot_id, Direction.ENTRY.value, not_before=at
        )
        if pending is None or sessions.find_open(db, account.account_id, lot.lot_id):
            return
        entry = _Entry(
            db,
            lot,
            account,
            pending.at,
            closed.now,
            closed.config,
            pending.gate_id,
            pending.event_id,
            True,
        )
        left = _pending_exit(entry)
        decision = _enter(entry, left)
        assert decision.session_id is not None
        sessions.settle_pending(db, pending, decision.session_id, closed.now)
        if left is None:
            return
        at = left.at


def _lost_ticket(exit_: _Exit) -> _Decision:
    """An exit with no known entry pays the tariff's flat fee, if it has one."""
    db, lot, account = exit_.db, exit_.lot, exit_.account
    version = pricing.version_at(db, lot.lot_id, exit_.at)
    flat = lost_ticket_quote(pricing.tariff_of(version, lot.timezone))
    if flat is None:
        return _deny(Reason.NO_OPEN_SESSION)
    parking = ParkingSession(
        session_id=new_id(),
        account_id=account.account_id,
        lot_id=lot.lot_id,
        state="open",
        entry_gate_id=exit_.gate_id,
        entry_event_id=exit_.event_id,
        entered_at=exit_.at,
        offline_entry=exit_.offline,
        currency=flat.amount.currency,
        lost_ticket=True,
    )
    return _settle(exit_, parking, StayPrice(flat, flat.amount.amount_minor), version.version)


def _payment_key(db: Session, parking: ParkingSession, event_id: str) -> str:
    """One key per stay; a stay reopened (its exit voided) pays again under a new one."""
    key = f"exit:{parking.session_id}"
    if db.exec(select(Payment.payment_id).where(Payment.idempotency_key == key)).first():
        return f"{key}:{event_id}"
    return key


def _settle(exit_: _Exit, parking: ParkingSession, stay: StayPrice, version: int) -> _Decision:
    due = stay.quote.amount.model_copy(update={"amount_minor": stay.due_minor})
    settled = payments.settle(
        exit_.db,
        exit_.config.payments,
        account=exit_.account,
        lot_id=exit_.lot.lot_id,
        session_id=parking.session_id,
        amount=due,
        key=_payment_key(exit_.db, parking, exit_.event_id),
        now=exit_.at,
        allow_debt=exit_.must_open or exit_.lot.payment_policy == "pay_later",
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
        gate_id=exit_.gate_id,
        event_id=exit_.event_id,
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
