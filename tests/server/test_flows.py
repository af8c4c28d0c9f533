"""The scan-event flow through a running Central (in-memory broker, fake clock), on SQLite
and PostgreSQL: decisions, charging, idempotency, replays, offline reconcile, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, select

from parking_protocol.messages import (
    DecodeFailure,
    EventAck,
    GateCommand,
    GatewayState,
    GatewayStatus,
    OfflineDecision,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import issue_code
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InboundMessage
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import AccountCreate, LedgerTransaction, Posting
from server.gateways.models import GatewayStatusRecord
from server.lots.models import LotCreate
from server.sessions.flows import Reply, handle_scan
from server.sessions.models import DeadLetter, ParkingSession, ProcessedEvent

if TYPE_CHECKING:
    from conftest import Lane, World

pytestmark = pytest.mark.usefixtures("database_url")


def sessions_of(world: World, state: str | None = None) -> list[Any]:
    return world.central.list_sessions(account_id=world.account_id, state=state)


def charges(world: World) -> list[LedgerTransaction]:
    with Session(world.central.engine) as db:
        return list(db.exec(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")))


async def enter(world: World) -> GateCommand:
    command = await world.entry.scan(world.code())
    assert command.action == GateAction.OPEN, command
    return command


async def test_entry_opens_a_session_and_the_gate(world: World) -> None:
    command = await world.entry.scan(world.code())

    assert (command.action, command.reason, command.display) == (
        GateAction.OPEN,
        Reason.WELCOME,
        "Welcome",
    )
    assert command.lot_id == "lot1"
    assert command.gate_id == "in1"
    assert command.issued_at == world.clock.now()
    assert command.deadline == world.clock.now() + timedelta(seconds=10)
    [parking] = sessions_of(world, "open")
    assert parking.session_id == command.session_id
    assert parking.entered_at == world.clock.now()
    assert world.central.get_lot("lot1").occupancy.open_sessions == 1


async def test_the_service_checks_each_scanned_codes_signature_ahead(world: World) -> None:
    """The bridge hands every scanned code to the signature checker's thread as it arrives
    (it decides the event with that result, or checks the code itself if it came first)."""
    command = await world.entry.scan(world.code())
    assert command.action is GateAction.OPEN
    checker = world.central.signatures
    for _ in range(500):
        if checker.checked == 1:
            break
        await asyncio.sleep(0.01)
    assert checker.checked == 1
    assert checker.used + len(checker._good) == 1  # used by the decision, or left over


async def test_exit_two_hours_later_charges_exactly_the_price(world: World) -> None:
    entry = await enter(world)
    world.clock.advance(timedelta(hours=2))

    command = await world.exit.scan(world.code())

    assert (command.action, command.reason) == (GateAction.OPEN, Reason.PAID)
    assert command.amount == Money(amount_minor=1000, currency="CNY")
    assert command.display == "Paid ¥10.00 - thank you"
    assert command.session_id == entry.session_id
    assert world.balance() == 10_000 - 1000
    parking = world.central.get_session(entry.session_id or "")
    assert parking.state == "closed"
    assert parking.exited_at == world.clock.now()
    assert parking.amount == Money(amount_minor=1000, currency="CNY")
    assert parking.settlement == "paid"
    assert sum(item.amount_minor for item in parking.line_items) == 1000
    [charge] = charges(world)
    with Session(world.central.engine) as db:
        postings = db.exec(
            select(Posting).where(Posting.transaction_id == charge.transaction_id)
        ).all()
    assert sorted((p.ledger_account, p.amount_minor) for p in postings) == [
        ("revenue:lot:lot1", 1000),
        ("wallet:alice", -1000),
    ]


async def test_exit_within_grace_is_free_and_posts_nothing(world: World) -> None:
    entry = await enter(world)
    world.clock.advance(timedelta(minutes=14))

    command = await world.exit.scan(world.code())

    assert (command.action, command.reason) == (GateAction.OPEN, Reason.PAID)
    assert command.amount == Money(amount_minor=0, currency="CNY")
    assert world.balance() == 10_000
    assert charges(world) == []
    parking = world.central.get_session(entry.session_id or "")
    assert (parking.state, parking.settlement) == ("closed", "free")


def _forged(world: World) -> str:
    kid = world.central.keys.active.kid
    return issue_code(
        Ed25519PrivateKey.generate(), kid=kid, account_id="alice", now=world.clock.now()
    )


def _unknown_key(world: World) -> str:
    other = Ed25519PrivateKey.generate()
    return issue_code(other, kid="someone", account_id="alice", now=world.clock.now())


def _expired(world: World) -> str:
    code = world.code()
    world.clock.advance(timedelta(seconds=66))  # 60 s lifetime + 5 s skew
    return code


def _not_yet_valid(world: World) -> str:
    return world.central.sign_code("alice", now=world.clock.now() + timedelta(minutes=2)).code


@pytest.mark.parametrize(
    ("make_code", "reason"),
    [
        (lambda w: "hello world", Reason.CODE_MALFORMED),
        (lambda w: "QP9.k.alice.1.2.n.s", Reason.CODE_UNKNOWN_VERSION),
        (_forged, Reason.CODE_BAD_SIGNATURE),
        (_unknown_key, Reason.CODE_UNKNOWN_KEY),
        (_expired, Reason.CODE_EXPIRED),
        (_not_yet_valid, Reason.CODE_NOT_YET_VALID),
    ],
    ids=["malformed", "unknown-version", "forged", "unknown-key", "expired", "not-yet-valid"],
)
@pytest.mark.parametrize("lane", ["entry", "exit"])
async def test_bad_codes_are_denied_with_their_reason_and_change_nothing(
    world: World, make_code: Any, reason: Reason, lane: str
) -> None:
    if lane == "exit":
        await enter(world)
    before = sessions_of(world)
    code = make_code(world)

    command = await getattr(world, lane).scan(code)

    assert (command.action, command.reason) == (GateAction.DENY, reason)
    assert command.display
    assert sessions_of(world) == before
    assert world.balance() == 10_000
    assert charges(world) == []


async def test_a_code_that_opened_a_gate_is_refused_as_replayed(world: World) -> None:
    code = world.code()
    entry = await world.entry.scan(code)
    assert entry.action == GateAction.OPEN
    world.clock.advance(timedelta(seconds=20))

    at_exit = await world.exit.scan(code)
    again_at_entry = await world.entry.scan(code)

    assert (at_exit.action, at_exit.reason) == (GateAction.DENY, Reason.CODE_REPLAYED)
    assert again_at_entry.reason == Reason.CODE_REPLAYED
    assert [s.state for s in sessions_of(world)] == ["open"]
    assert world.balance() == 10_000


async def test_second_entry_while_inside_is_already_inside(world: World) -> None:
    await enter(world)

    command = await world.entry.scan(world.code())

    assert (command.action, command.reason) == (GateAction.DENY, Reason.ALREADY_INSIDE)
    assert len(sessions_of(world)) == 1


async def test_redelivered_events_change_nothing_and_get_the_same_command(world: World) -> None:
    entry_event = world.entry.event(world.code())
    first_entry = await world.entry.send(entry_event)
    again_entry = await world.entry.send(entry_event)
    world.clock.advance(timedelta(hours=3))
    exit_event = world.exit.event(world.code())
    first_exit = await world.exit.send(exit_event)
    again_exit = await world.exit.send(exit_event)
    world.clock.advance(timedelta(minutes=5))
    third_exit = await world.exit.send(exit_event)

    assert again_entry == first_entry
    assert again_exit == first_exit == third_exit
    assert isinstance(first_exit, GateCommand)
    assert first_exit.reason == Reason.PAID
    assert len(sessions_of(world)) == 1
    assert len(charges(world)) == 1
    assert world.balance() == 10_000 - 1500
    assert world.central.stats.replays == 3


async def test_insufficient_balance_denies_and_charges_nothing(world: World) -> None:
    world.central.create_account(AccountCreate(account_id="bob", name="Bob"))
    world.central.topup("bob", 100, idempotency_key="bob-1")
    assert (await world.entry.scan(world.code("bob"))).reason == Reason.WELCOME
    world.clock.advance(timedelta(hours=3))

    denied = await world.exit.scan(world.code("bob"))

    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.INSUFFICIENT_BALANCE)
    assert denied.amount == Money(amount_minor=1500, currency="CNY")
    assert world.balance("bob") == 100
    assert charges(world) == []
    assert [s.state for s in world.central.list_sessions(account_id="bob")] == ["open"]

    world.central.topup("bob", 2000, idempotency_key="bob-2")
    paid = await world.exit.scan(world.code("bob"))
    assert (paid.reason, paid.amount) == (Reason.PAID, Money(amount_minor=1500, currency="CNY"))
    assert world.balance("bob") == 600


async def test_unknown_and_blocked_accounts_are_denied(world: World) -> None:
    ghost = world.central.sign_code("ghost").code
    assert (await world.entry.scan(ghost)).reason == Reason.ACCOUNT_UNKNOWN

    world.central.set_blocked("alice")
    assert (await world.entry.scan(world.code())).reason == Reason.ACCOUNT_BLOCKED
    assert sessions_of(world) == []


async def test_full_lot_denies_entry(world: World) -> None:
    for name in ("bob", "carol", "dave"):
        world.central.create_account(AccountCreate(account_id=name, name=name))
    assert (await world.entry.scan(world.code("bob"))).reason == Reason.WELCOME
    assert (await world.entry.scan(world.code("carol"))).reason == Reason.WELCOME

    command = await world.entry.scan(world.code("dave"))

    assert (command.action, command.reason) == (GateAction.DENY, Reason.LOT_FULL)
    assert world.central.get_lot("lot1").occupancy.full


async def test_exit_without_open_session_is_denied(world: World) -> None:
    command = await world.exit.scan(world.code())

    assert (command.action, command.reason) == (GateAction.DENY, Reason.NO_OPEN_SESSION)


async def test_event_naming_another_gate_than_its_topic_is_gate_mismatch(world: World) -> None:
    event = world.entry.event(world.code(), gate_id="out1", direction=Direction.EXIT)

    command = await world.entry.send(event)

    assert isinstance(command, GateCommand)
    assert (command.action, command.reason) == (GateAction.DENY, Reason.GATE_MISMATCH)
    assert command.gate_id == "in1"  # answered on the topic it came from
    assert sessions_of(world) == []


async def test_unregistered_gate_is_denied(
    world: World, make_lane: Callable[..., Awaitable[Lane]]
) -> None:
    ghost = await make_lane("lot1", "ghost", Direction.ENTRY)

    command = await ghost.scan(world.code())

    assert command.reason == Reason.GATE_UNKNOWN


async def test_malformed_payloads_are_counted_and_the_consumer_keeps_working(
    world: World,
) -> None:
    await world.entry.publish(b"\xff not json")
    await world.entry.publish(b'{"v": 7, "type": "scan"}')
    await world.entry.publish(b'{"v": 1, "type": "scan", "event_id": "x"}')
    await world.entry.publish(
        encode(
            GatewayStatus(
                status_id=new_id(),
                lot_id="lot1",
                gate_id="in1",
                state=GatewayState.ONLINE,
                sent_at=world.clock.now(),
            )
        )
    )

    command = await world.entry.scan(world.code())

    assert command.reason == Reason.WELCOME
    failures = world.central.stats.decode_failures
    assert failures[DecodeFailure.NOT_JSON] == 1
    assert failures[DecodeFailure.UNKNOWN_VERSION] == 1
    assert failures[DecodeFailure.INVALID] == 1
    assert failures[DecodeFailure.WRONG_TYPE] == 1


async def test_unknown_topics_are_counted_and_dropped(world: World) -> None:
    bridge = world.central.bridge
    assert bridge is not None

    assert bridge.accept(InboundMessage("qrpark/v1/lots/lot1/gates/in1/bogus", b"{}")) is None
    assert bridge.accept(InboundMessage("qrpark/v1/lots/lot1/denylist", b"{}")) is None
    assert bridge.stats.bad_topics == 2


async def test_a_failing_event_is_dead_lettered_and_later_events_still_work(
    world: World,
) -> None:
    bridge = world.central.bridge
    assert bridge is not None
    poison = world.code()

    def flaky(db: Session, event: ScanEvent, *args: Any, **kwargs: Any) -> Reply:
        if event.code == poison:
            raise RuntimeError("boom")
        return handle_scan(db, event, *args, **kwargs)

    bridge.handler = flaky
    failed_event = world.entry.event(poison)
    await world.entry.publish(encode(failed_event))
    await world.entry.publish(encode(world.entry.event(world.code())))

    failed = await world.entry.next_reply()
    ok = await world.entry.next_reply()

    assert isinstance(failed, GateCommand)
    assert (failed.action, failed.reason) == (GateAction.DENY, Reason.INTERNAL_ERROR)
    assert isinstance(ok, GateCommand)
    assert ok.reason == Reason.WELCOME
    with Session(world.central.engine) as db:
        [letter] = db.exec(select(DeadLetter)).all()
        assert letter.event_id == failed_event.event_id
        assert "boom" in letter.error
        assert letter.payload == encode(failed_event)
        # not marked processed: a redelivery is tried again
        assert db.get(ProcessedEvent, failed_event.event_id) is None
    assert len(sessions_of(world)) == 1


async def test_events_are_group_committed_and_answered_in_order(world: World) -> None:
    events = [world.entry.event(f"junk-{i}") for i in range(60)]
    for event in events:
        await world.entry.publish(encode(event))

    replies = [await world.entry.next_reply() for _ in events]

    assert [r.event_id for r in replies] == [e.event_id for e in events]
    assert world.central.stats.largest_batch > 1
    assert world.central.stats.batches < len(events)


async def test_offline_entry_is_reconciled_even_if_the_code_expired_since(world: World) -> None:
    scanned_at = world.clock.now()
    code = world.code()
    world.clock.advance(timedelta(hours=1))  # the gateway was cut off for an hour
    event = world.entry.event(
        code,
        scanned_at=scanned_at,
        offline=OfflineDecision(
            action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=scanned_at
        ),
    )

    ack = await world.entry.send(event)
    again = await world.entry.send(event)

    assert isinstance(ack, EventAck)
    assert ack.result == Reason.WELCOME
    assert again == ack
    [parking] = sessions_of(world, "open")
    assert parking.session_id == ack.session_id
    assert parking.entered_at == scanned_at
    assert parking.offline_entry

    world.clock.advance(timedelta(minutes=30))  # priced from the offline entry: 1.5 h
    paid = await world.exit.scan(world.code())
    assert paid.amount == Money(amount_minor=1000, currency="CNY")


async def test_offline_entry_with_a_forged_code_opens_no_session(world: World) -> None:
    now = world.clock.now()
    event = world.entry.event(
        _forged(world),
        offline=OfflineDecision(action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=now),
    )

    ack = await world.entry.send(event)

    assert isinstance(ack, EventAck)
    assert ack.result == Reason.CODE_BAD_SIGNATURE
    assert sessions_of(world) == []


async def test_offline_exit_with_short_balance_closes_the_session_as_owed(world: World) -> None:
    world.central.create_account(AccountCreate(account_id="bob", name="Bob"))
    world.central.topup("bob", 300, idempotency_key="bob-1")
    entry = await world.entry.scan(world.code("bob"))
    world.clock.advance(timedelta(hours=2))
    scanned_at = world.clock.now()
    event = world.exit.event(
        world.code("bob"),
        offline=OfflineDecision(action=GateAction.OPEN, reason=Reason.PAID, decided_at=scanned_at),
    )
    world.clock.advance(timedelta(minutes=40))

    ack = await world.exit.send(event)

    assert isinstance(ack, EventAck)
    assert ack.amount == Money(amount_minor=1000, currency="CNY")
    parking = world.central.get_session(entry.session_id or "")
    assert (parking.state, parking.settlement) == ("closed", "owed")
    assert parking.exited_at == scanned_at
    assert world.balance("bob") == 300  # the wallet is untouched ...
    assert world.central.get_account("bob").debt_minor == 1000  # ... the stay is a debt
    topped = world.central.topup("bob", 1000, idempotency_key="bob-2")
    assert topped.collected_minor == 1000  # collected at the next top-up
    assert world.balance("bob") == 300
    assert world.central.get_account("bob").debt_minor == 0
    assert world.central.get_session(entry.session_id or "").settlement == "paid"


async def test_offline_deny_is_just_acknowledged(world: World) -> None:
    now = world.clock.now()
    event = world.entry.event(
        world.code(),
        offline=OfflineDecision(action=GateAction.DENY, reason=Reason.CODE_EXPIRED, decided_at=now),
    )

    ack = await world.entry.send(event)

    assert isinstance(ack, EventAck)
    assert ack.result == Reason.CODE_EXPIRED
    assert sessions_of(world) == []


def _status(world: World, state: GatewayState, boot: int, **extra: Any) -> GatewayStatus:
    return GatewayStatus(
        status_id=new_id(),
        lot_id="lot1",
        gate_id="in1",
        state=state,
        boot=boot,
        sent_at=world.clock.now(),
        firmware_version="1.2.3",
        **extra,
    )


async def test_gateway_status_keeps_the_latest_and_ignores_a_stale_last_will(
    world: World,
) -> None:
    topic = gate_topic("lot1", "in1", TopicKind.STATUS)
    await world.entry.publish(
        encode(_status(world, GatewayState.ONLINE, 2, queue_depth=3)), topic=topic
    )
    await world.entry.publish(encode(_status(world, GatewayState.OFFLINE, 1)), topic=topic)
    await world.entry.scan(world.code())  # a barrier: everything before it is committed

    with Session(world.central.engine) as db:
        record = db.get(GatewayStatusRecord, ("lot1", "in1"))
        assert record is not None
        assert (record.state, record.boot, record.queue_depth) == ("online", 2, 3)

    await world.entry.publish(encode(_status(world, GatewayState.OFFLINE, 2)), topic=topic)
    await world.entry.scan(world.code())
    with Session(world.central.engine) as db:
        record = db.get(GatewayStatusRecord, ("lot1", "in1"))
        assert record is not None
        assert record.state == "offline"


async def test_money_constraints_hold_in_the_database(world: World) -> None:
    await enter(world)
    world.clock.advance(timedelta(hours=1))
    await world.exit.scan(world.code())
    with Session(world.central.engine) as db:
        unbalanced = db.exec(
            select(Posting.transaction_id)
            .group_by(Posting.transaction_id)
            .having(sa.func.sum(Posting.amount_minor) != 0)
        ).all()
        assert unbalanced == []
        assert len(db.exec(select(ParkingSession)).all()) == 1
        db.add(
            ParkingSession(
                session_id=new_id(),
                account_id="alice",
                lot_id="lot1",
                state="open",
                entry_gate_id="in1",
                entry_event_id=new_id(),
                entered_at=world.clock.now(),
                currency="CNY",
            )
        )
        db.flush()  # one open session is allowed ...
        db.add(
            ParkingSession(
                session_id=new_id(),
                account_id="alice",
                lot_id="lot1",
                state="open",
                entry_gate_id="in1",
                entry_event_id=new_id(),
                entered_at=world.clock.now(),
                currency="CNY",
            )
        )
        with pytest.raises(sa.exc.IntegrityError):
            db.flush()  # ... a second is refused by the partial unique index
        db.rollback()
        posting = db.exec(select(Posting)).first()
        assert posting is not None
        posting.amount_minor += 1
        db.add(posting)
        with pytest.raises(RuntimeError, match="never be changed"):
            db.flush()


async def test_another_lot_is_independent(world: World) -> None:
    world.central.create_lot(LotCreate(lot_id="lot2", name="Second", capacity=5))
    await enter(world)
    assert world.central.get_lot("lot2").occupancy.open_sessions == 0


@pytest.mark.parametrize("amount", [None, Money(amount_minor=1500, currency="CNY")])
def test_a_command_built_without_validation_equals_the_validated_one(
    amount: Money | None,
) -> None:
    from datetime import UTC, datetime

    from parking_protocol.topics import parse_topic
    from server.sessions.flows import FlowConfig, _command_for, _Decision

    ref = parse_topic(gate_topic("lot1", "out1", TopicKind.EVENTS))
    assert ref is not None
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    decision = _Decision(GateAction.OPEN, Reason.PAID, amount=amount, session_id="s-1")
    reply = _command_for(new_id(), ref, decision, now, FlowConfig(keys={}))
    validated = GateCommand.model_validate(reply.message.model_dump())
    assert validated == reply.message
    assert encode(validated) == reply.payload
    assert decode(reply.payload) == reply.message
