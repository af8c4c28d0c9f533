"""Offline and late events reconciled in every order the gates can produce: nothing lost,
nothing doubled, and the service's sessions end up as the barriers actually moved."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import EventAck, GateCommand, OfflineDecision, ScanEvent
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import AccountCreate, LedgerTransaction
from server.central import Central
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.pricing.models import TariffSpec
from server.sessions.models import PendingScan, ReconcileFlag, UsedNonce

if TYPE_CHECKING:
    from conftest import Lane, World
from money_support import Desk

pytestmark = pytest.mark.usefixtures("database_url")

HOUR = 500  # the fixture's tariff: ¥5.00 per started hour after 15 minutes' grace


def offline(event: ScanEvent, action: GateAction = GateAction.OPEN) -> ScanEvent:
    """The same event as the gateway replays it after deciding on its own."""
    reason = Reason.WELCOME if action is GateAction.OPEN else Reason.SERVICE_UNAVAILABLE
    decision = OfflineDecision(action=action, reason=reason, decided_at=event.scanned_at)
    return event.model_copy(update={"offline": decision})


def offline_event(lane: Lane, code: str, at: datetime) -> ScanEvent:
    return offline(lane.event(code, scanned_at=at))


def sessions_of(world: World, account: str = "alice") -> list[Any]:
    found = world.central.list_sessions(account_id=account)
    return sorted(found, key=lambda s: s.entered_at)


def stays(world: World, account: str = "alice") -> list[tuple[Any, ...]]:
    return [(s.state, s.entered_at, s.exited_at) for s in sessions_of(world, account)]


def charges(world: World) -> int:
    with Session(world.central.engine) as db:
        return len(
            db.exec(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all()
        )


def flags(world: World) -> list[str]:
    with Session(world.central.engine) as db:
        return [f.kind for f in db.exec(select(ReconcileFlag)).all()]


def pending(world: World) -> list[PendingScan]:
    with Session(world.central.engine) as db:
        return list(db.exec(select(PendingScan).where(PendingScan.session_id == None)).all())  # noqa: E711


async def test_offline_exit_reconciled_before_its_offline_entry_closes_the_stay(
    world: World,
) -> None:
    t0 = world.clock.now()
    entry = offline_event(world.entry, world.code(), t0)
    world.clock.advance(timedelta(minutes=90))
    t1 = world.clock.now()
    exit_ = offline_event(world.exit, world.code(), t1)
    world.clock.advance(timedelta(minutes=5))

    exit_ack = await world.exit.send(exit_)  # the exit lane came back first
    assert isinstance(exit_ack, EventAck)
    assert exit_ack.result == Reason.NO_OPEN_SESSION
    assert sessions_of(world) == []
    assert [p.event_id for p in pending(world)] == [exit_.event_id]

    entry_ack = await world.entry.send(entry)

    assert isinstance(entry_ack, EventAck)
    assert stays(world) == [("closed", t0, t1)]
    (stay,) = sessions_of(world)
    assert (stay.offline_entry, stay.offline_exit) == (True, True)
    assert stay.amount == Money(amount_minor=2 * HOUR, currency="CNY")
    assert world.balance() == 10_000 - 2 * HOUR
    assert pending(world) == []
    assert world.central.get_lot("lot1").occupancy.open_sessions == 0

    # Both replayed again (acks lost): nothing changes.
    assert await world.exit.send(exit_) == exit_ack
    assert await world.entry.send(entry) == entry_ack
    assert len(sessions_of(world)) == 1
    assert charges(world) == 1


async def test_an_offline_exit_short_of_money_settled_by_its_entry_becomes_a_debt(
    world: World,
) -> None:
    world.central.create_account(AccountCreate(account_id="bob", name="Bob"))
    world.central.topup("bob", 100, idempotency_key="bob-1")
    t0 = world.clock.now()
    entry = offline_event(world.entry, world.code("bob"), t0)
    world.clock.advance(timedelta(hours=3))
    await world.exit.send(offline_event(world.exit, world.code("bob"), world.clock.now()))

    await world.entry.send(entry)

    (stay,) = sessions_of(world, "bob")
    assert (stay.state, stay.settlement) == ("closed", "owed")
    assert world.balance("bob") == 100
    assert world.central.get_account("bob").debt_minor == 3 * HOUR


async def test_two_offline_visits_whose_exits_arrive_first_pair_up_by_time(world: World) -> None:
    t = world.clock.now()
    times = [t, t + timedelta(hours=1), t + timedelta(hours=2), t + timedelta(hours=4)]
    events = []
    for at, lane in zip(times, [world.entry, world.exit, world.entry, world.exit], strict=True):
        world.clock.set(at)
        events.append(offline_event(lane, world.code(), at))
    world.clock.advance(timedelta(minutes=1))

    for event in (events[1], events[3], events[0], events[2]):  # both exits, then the entries
        assert isinstance(
            await (world.exit if event.gate_id == "out1" else world.entry).send(event), EventAck
        )

    assert stays(world) == [("closed", times[0], times[1]), ("closed", times[2], times[3])]
    assert world.balance() == 10_000 - HOUR - 2 * HOUR
    assert pending(world) == []


async def test_offline_entry_while_an_earlier_stay_is_open_waits_for_that_stays_exit(
    world: World,
) -> None:
    t0 = world.clock.now()
    await world.entry.scan(world.code())  # online: the stay is known
    world.clock.advance(timedelta(hours=1))
    t1 = world.clock.now()
    left = offline_event(world.exit, world.code(), t1)  # the exit lane is cut off
    world.clock.advance(timedelta(minutes=30))
    t2 = world.clock.now()
    back = offline_event(world.entry, world.code(), t2)  # so is the entry lane, later

    ack = await world.entry.send(back)  # the entry lane comes back first
    assert isinstance(ack, EventAck)
    assert ack.result == Reason.ALREADY_INSIDE
    assert stays(world) == [("open", t0, None)]

    await world.exit.send(left)

    assert stays(world) == [("closed", t0, t1), ("open", t2, None)]
    world.clock.advance(timedelta(minutes=20))
    paid = await world.exit.scan(world.code())
    assert (paid.action, paid.amount) == (GateAction.OPEN, Money(amount_minor=HOUR, currency="CNY"))
    assert stays(world) == [("closed", t0, t1), ("closed", t2, world.clock.now())]
    assert world.balance() == 10_000 - 2 * HOUR


async def test_online_exit_of_a_stay_begun_by_a_pending_offline_entry(world: World) -> None:
    t0 = world.clock.now()
    await world.entry.scan(world.code())
    world.clock.advance(timedelta(hours=1))
    t1 = world.clock.now()
    left = offline_event(world.exit, world.code(), t1)  # still in the exit gateway's outbox
    world.clock.advance(timedelta(minutes=30))
    t2 = world.clock.now()
    await world.entry.send(offline_event(world.entry, world.code(), t2))
    world.clock.advance(timedelta(minutes=20))
    t3 = world.clock.now()

    paid = await world.exit.scan(world.code())  # online again: this exit ends the later stay

    assert paid.action == GateAction.OPEN
    assert stays(world) == [("open", t0, None), ("closed", t2, t3)]
    await world.exit.send(left)
    assert stays(world) == [("closed", t0, t1), ("closed", t2, t3)]
    assert world.balance() == 10_000 - 2 * HOUR


async def test_a_delayed_online_event_is_judged_when_it_was_scanned(world: World) -> None:
    await world.entry.scan(world.code())
    world.clock.advance(timedelta(hours=2))
    scanned_at = world.clock.now()
    event = world.exit.event(world.code(), scanned_at=scanned_at)
    world.clock.advance(timedelta(seconds=80))  # the service was restarting: the code expired

    command = await world.exit.send(event)

    assert isinstance(command, GateCommand)
    assert (command.action, command.reason) == (GateAction.OPEN, Reason.PAID)
    (stay,) = sessions_of(world)
    assert stay.exited_at == scanned_at


@pytest.mark.parametrize(
    ("scanned", "reason"),
    [
        (-timedelta(minutes=16), Reason.CODE_EXPIRED),  # older than max_event_age: judged now
        (timedelta(minutes=2), Reason.CODE_NOT_YET_VALID),  # from the future: judged now
    ],
    ids=["too-old", "future"],
)
async def test_an_implausible_scanned_at_is_not_trusted(
    world: World, scanned: timedelta, reason: Reason
) -> None:
    start = world.clock.now()
    code = world.central.sign_code("alice", now=start + scanned).code
    command = await world.entry.send(world.entry.event(code, scanned_at=start + scanned))

    assert isinstance(command, GateCommand)
    assert (command.action, command.reason) == (GateAction.DENY, reason)
    assert sessions_of(world) == []


async def test_late_deny_then_the_gates_offline_exit_closes_the_stay_as_owed(
    world: World,
) -> None:
    world.central.create_account(AccountCreate(account_id="bob", name="Bob"))
    world.central.topup("bob", 100, idempotency_key="bob-1")
    await world.entry.scan(world.code("bob"))
    world.clock.advance(timedelta(hours=3))
    scanned_at = world.clock.now()
    event = world.exit.event(world.code("bob"))
    denied = await world.exit.send(event)  # too late: the gate already opened on its own
    assert isinstance(denied, GateCommand)
    assert denied.reason == Reason.INSUFFICIENT_BALANCE
    world.clock.advance(timedelta(seconds=5))

    ack = await world.exit.send(offline(event))

    assert isinstance(ack, EventAck)
    assert ack.amount == Money(amount_minor=3 * HOUR, currency="CNY")
    (stay,) = sessions_of(world, "bob")
    assert (stay.state, stay.settlement, stay.exited_at) == ("closed", "owed", scanned_at)
    assert world.central.get_account("bob").debt_minor == 3 * HOUR
    # The same replay twice, and the original online event once more: the same ack.
    assert await world.exit.send(offline(event)) == ack
    assert await world.exit.send(event) == ack
    assert world.central.get_account("bob").debt_minor == 3 * HOUR
    assert charges(world) == 1


async def test_late_deny_then_the_gates_offline_entry_opens_an_offline_stay(
    world: World,
) -> None:
    await world.entry.scan(world.code())
    world.clock.advance(timedelta(hours=1))
    await world.exit.scan(world.code())
    world.clock.advance(timedelta(minutes=1))
    code = world.code()
    event = world.entry.event(code)
    world.central.set_blocked("alice")  # say the service denies, late; the gate had opened
    denied = await world.entry.send(event)
    assert isinstance(denied, GateCommand)
    assert denied.action == GateAction.DENY
    world.central.set_blocked("alice", False)

    ack = await world.entry.send(offline(event))

    assert isinstance(ack, EventAck)
    assert ack.session_id is not None
    open_stays = [s for s in sessions_of(world) if s.state == "open"]
    assert [(s.entered_at, s.offline_entry) for s in open_stays] == [(event.scanned_at, True)]
    assert await world.entry.send(offline(event)) == ack
    assert len(sessions_of(world)) == 2


async def test_late_open_entry_but_the_gate_stayed_shut_voids_the_stay(world: World) -> None:
    code = world.code()
    event = world.entry.event(code)
    opened = await world.entry.send(event)  # too late: the gate had denied on its own
    assert isinstance(opened, GateCommand)
    assert opened.action == GateAction.OPEN

    ack = await world.entry.send(offline(event, GateAction.DENY))

    assert isinstance(ack, EventAck)
    assert [s.state for s in sessions_of(world)] == ["void"]
    assert world.central.get_lot("lot1").occupancy.open_sessions == 0
    with Session(world.central.engine) as db:
        assert db.exec(select(UsedNonce)).all() == []  # the code was not spent
    assert await world.entry.send(offline(event, GateAction.DENY)) == ack
    assert (await world.entry.scan(code)).action == GateAction.OPEN  # the driver tries again


async def test_late_open_exit_but_the_gate_stayed_shut_reopens_the_stay_and_refunds(
    world: World,
) -> None:
    await world.entry.scan(world.code())
    world.clock.advance(timedelta(hours=2))
    event = world.exit.event(world.code())
    paid = await world.exit.send(event)
    assert isinstance(paid, GateCommand)
    assert paid.amount == Money(amount_minor=2 * HOUR, currency="CNY")

    ack = await world.exit.send(offline(event, GateAction.DENY))

    assert isinstance(ack, EventAck)
    assert [s.state for s in sessions_of(world)] == ["open"]
    assert world.balance() == 10_000
    assert await world.exit.send(offline(event, GateAction.DENY)) == ack
    assert world.balance() == 10_000

    world.clock.advance(timedelta(minutes=30))
    again = await world.exit.scan(world.code())
    assert (again.action, again.amount) == (
        GateAction.OPEN,
        Money(amount_minor=3 * HOUR, currency="CNY"),
    )
    assert world.balance() == 10_000 - 3 * HOUR


async def test_the_online_answer_arriving_after_the_offline_replay_changes_nothing(
    world: World,
) -> None:
    event = world.entry.event(world.code())
    ack = await world.entry.send(offline(event))  # the replay overtook the original
    assert isinstance(ack, EventAck)

    again = await world.entry.send(event)

    assert again == ack
    assert len(sessions_of(world)) == 1


async def test_the_same_code_used_offline_at_two_gates_is_flagged_not_doubled(
    world: World, make_lane: Any
) -> None:
    world.central.create_gate("lot1", GateCreate(gate_id="in2", direction=Direction.ENTRY))
    second: Lane = await make_lane("lot1", "in2", Direction.ENTRY)
    code = world.code()
    at = world.clock.now()
    first = offline_event(world.entry, code, at)
    copy = offline_event(second, code, at + timedelta(seconds=20))

    await world.entry.send(first)
    copied = await second.send(copy)
    await second.send(copy)

    assert isinstance(copied, EventAck)
    assert copied.result == Reason.CODE_REPLAYED
    assert len(sessions_of(world)) == 1
    assert flags(world) == ["code_reused"]


async def test_an_offline_entry_after_a_lost_ticket_exit_is_that_stays_entry(
    central: Central, clock: FakeClock
) -> None:
    central.create_lot(
        LotCreate(
            lot_id="lot1", name="Main", capacity=50, tariff=TariffSpec(lost_ticket_minor=8000)
        )
    )
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="bob", name="Bob"))
    central.topup("bob", 10_000, idempotency_key="bob-seed")
    desk = Desk(central, clock)
    entry = offline(desk.event("bob", Direction.ENTRY))  # still in the entry lane's outbox
    clock.advance(timedelta(hours=1))
    lost = desk.exit("bob")  # online: no entry known, the lost-ticket fee opens the gate
    assert lost.amount == Money(amount_minor=8000, currency="CNY")

    ack = desk.deliver(entry)
    again = desk.deliver(entry)

    assert isinstance(ack, EventAck)
    assert ack.session_id == lost.session_id
    assert again == ack
    assert [(s.state, s.lost_ticket) for s in central.list_sessions(account_id="bob")] == [
        ("closed", True)
    ]
    assert central.balance("bob") == 10_000 - 8000
    with Session(central.engine) as db:
        assert [f.kind for f in db.exec(select(ReconcileFlag)).all()] == ["entry_after_lost_ticket"]


# -- an exit pairs with the stay its scan time falls in, whenever it arrives ----------------------

H = timedelta(hours=1)


def minted(world: World, lane: Lane, at: datetime) -> ScanEvent:
    """An event scanned at ``at`` with a code valid then (the clock is moved to ``at``)."""
    world.clock.set(at)
    return lane.event(world.code(), scanned_at=at)


async def crossed(world: World) -> tuple[datetime, ScanEvent, ScanEvent]:
    """Entry A1 (t0, offline), exit X1 (t0+1 h), entry A2 (t0+2 h, offline), exit X2 (t0+4 h).

    X1 reaches the service live before A1 was replayed (denied, "no parking session"; the
    lane opened on its own); X2 arrives live and ends the only stay known; then A2 is
    replayed and opens a second one. Returns t0, X1 and X2.
    """
    t0 = world.clock.now()
    a1 = offline(minted(world, world.entry, t0))
    x1 = minted(world, world.exit, t0 + H)
    denied = await world.exit.send(x1)
    assert isinstance(denied, GateCommand)
    assert denied.reason == Reason.NO_OPEN_SESSION
    await world.entry.send(a1)
    a2 = offline(minted(world, world.entry, t0 + 2 * H))
    x2 = minted(world, world.exit, t0 + 4 * H)
    paid = await world.exit.send(x2)
    assert paid.amount == Money(amount_minor=4 * HOUR, currency="CNY")
    await world.entry.send(a2)
    assert stays(world) == [("closed", t0, t0 + 4 * H), ("open", t0 + 2 * H, None)]
    return t0, x1, x2


async def test_an_exit_arriving_after_a_later_exit_ends_its_own_stay_and_passes_that_on(
    world: World,
) -> None:
    t0, x1, x2 = await crossed(world)

    ack = await world.exit.send(offline(x1))  # X1 re-sent as the offline open it was

    assert isinstance(ack, EventAck)
    assert stays(world) == [("closed", t0, t0 + H), ("closed", t0 + 2 * H, t0 + 4 * H)]
    first, second = sessions_of(world)
    assert ack.session_id == first.session_id
    assert first.amount == Money(amount_minor=HOUR, currency="CNY")  # priced at its own times
    assert second.amount == Money(amount_minor=2 * HOUR, currency="CNY")
    assert world.balance() == 10_000 - 3 * HOUR  # 4 hours charged, 3 refunded, 2 charged
    assert charges(world) == 2
    assert pending(world) == []
    assert flags(world) == []
    # X2's stored answer now names the stay it ended; replays change nothing.
    again = await world.exit.send(x2)
    assert again.session_id == second.session_id
    assert await world.exit.send(offline(x1)) == ack
    assert world.balance() == 10_000 - 3 * HOUR


async def test_a_later_exit_freed_by_an_earlier_one_waits_for_its_own_entry(world: World) -> None:
    t0 = world.clock.now()
    a1 = offline(minted(world, world.entry, t0))
    x1 = offline(minted(world, world.exit, t0 + H))
    a2 = offline(minted(world, world.entry, t0 + 2 * H))
    x2 = minted(world, world.exit, t0 + 4 * H)
    await world.entry.send(a1)
    await world.exit.send(x2)  # live: ends the only stay known

    await world.exit.send(x1)

    assert stays(world) == [("closed", t0, t0 + H)]
    assert [p.event_id for p in pending(world)] == [x2.event_id]
    assert world.balance() == 10_000 - HOUR

    await world.entry.send(a2)

    assert stays(world) == [("closed", t0, t0 + H), ("closed", t0 + 2 * H, t0 + 4 * H)]
    assert pending(world) == []
    assert world.balance() == 10_000 - 3 * HOUR
    assert world.central.get_lot("lot1").occupancy.open_sessions == 0


async def test_an_early_exit_re_pairs_every_later_stay_in_turn(world: World) -> None:
    t0 = world.clock.now()
    a1 = offline(minted(world, world.entry, t0))
    x1 = offline(minted(world, world.exit, t0 + H))
    a2 = offline(minted(world, world.entry, t0 + 2 * H))
    await world.entry.send(a1)
    await world.exit.send(minted(world, world.exit, t0 + 3 * H))  # ends A1's stay, for now
    await world.entry.send(a2)
    a3 = offline(minted(world, world.entry, t0 + 4 * H))
    await world.exit.send(minted(world, world.exit, t0 + 6 * H))  # ends A2's stay, for now
    await world.entry.send(a3)
    assert stays(world) == [
        ("closed", t0, t0 + 3 * H),
        ("closed", t0 + 2 * H, t0 + 6 * H),
        ("open", t0 + 4 * H, None),
    ]

    await world.exit.send(x1)

    assert stays(world) == [
        ("closed", t0, t0 + H),
        ("closed", t0 + 2 * H, t0 + 3 * H),
        ("closed", t0 + 4 * H, t0 + 6 * H),
    ]
    assert [s.amount.amount_minor for s in sessions_of(world)] == [HOUR, HOUR, 2 * HOUR]
    assert world.balance() == 10_000 - 4 * HOUR
    assert pending(world) == []


async def test_voiding_a_re_paired_exit_reopens_the_stay_it_moved_to(world: World) -> None:
    t0, x1, x2 = await crossed(world)
    await world.exit.send(offline(x1))

    # The live "open" for X2 came too late: that barrier had stayed shut.
    ack = await world.exit.send(offline(x2, GateAction.DENY))

    assert isinstance(ack, EventAck)
    assert stays(world) == [("closed", t0, t0 + H), ("open", t0 + 2 * H, None)]
    assert world.balance() == 10_000 - HOUR
    assert flags(world) == []


async def test_a_re_paired_stay_owed_as_a_debt_keeps_its_charge_and_is_flagged(
    world: World,
) -> None:
    world.central.create_account(AccountCreate(account_id="bob", name="Bob"))
    world.central.topup("bob", 100, idempotency_key="bob-1")
    t0 = world.clock.now()
    events = []
    for lane, at in [(world.entry, t0), (world.exit, t0 + H), (world.entry, t0 + 2 * H)]:
        world.clock.set(at)
        events.append(offline(lane.event(world.code("bob"), scanned_at=at)))
    world.clock.set(t0 + 4 * H)
    a1, x1, a2 = events
    x2 = offline(world.exit.event(world.code("bob")))
    for event in (a1, x2, a2):  # X2 ends A1's stay as a debt of 4 hours; A2 opens a stay
        lane = world.entry if event.direction is Direction.ENTRY else world.exit
        await lane.send(event)

    await world.exit.send(x1)

    assert stays(world, "bob") == [("closed", t0, t0 + H), ("closed", t0 + 2 * H, t0 + 4 * H)]
    first, second = sessions_of(world, "bob")
    # A debt cannot be lowered here: the first stay keeps its 4 hours, shown as such.
    assert first.amount == Money(amount_minor=4 * HOUR, currency="CNY")
    assert sum(item.amount_minor for item in first.line_items) == 4 * HOUR
    assert first.line_items[-1].amount_minor == 3 * HOUR
    assert second.amount == Money(amount_minor=2 * HOUR, currency="CNY")
    assert world.central.get_account("bob").debt_minor == 6 * HOUR
    assert world.balance("bob") == 100
    assert flags(world) == ["re_paired_charge_kept"]


async def test_an_offline_entry_ends_at_the_first_exit_after_it_not_a_later_lost_ticket(
    central: Central, clock: FakeClock
) -> None:
    central.create_lot(
        LotCreate(
            lot_id="lot1", name="Main", capacity=50, tariff=TariffSpec(lost_ticket_minor=8000)
        )
    )
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="bob", name="Bob"))
    central.topup("bob", 10_000, idempotency_key="bob-seed")
    desk = Desk(central, clock)
    t0 = clock.now()
    entry = offline(desk.event("bob", Direction.ENTRY))  # still in the entry lane's outbox
    clock.advance(H)
    left = offline(desk.event("bob", Direction.EXIT))
    waiting = desk.deliver(left)
    assert isinstance(waiting, EventAck)
    assert waiting.result == Reason.NO_OPEN_SESSION
    clock.advance(H)
    lost = desk.exit("bob")  # a later visit whose entry is not known either: lost ticket
    assert lost.amount == Money(amount_minor=8000, currency="CNY")

    ack = desk.deliver(entry)

    found = sorted(central.list_sessions(account_id="bob"), key=lambda s: s.entered_at)
    assert [(s.entered_at, s.exited_at, s.lost_ticket) for s in found] == [
        (t0, t0 + H, False),
        (t0 + 2 * H, t0 + 2 * H, True),
    ]
    assert isinstance(ack, EventAck)
    assert ack.session_id == found[0].session_id
    with Session(central.engine) as db:
        assert db.exec(select(PendingScan).where(PendingScan.session_id == None)).all() == []  # noqa: E711
    assert found[0].amount is not None
    assert central.balance("bob") == 10_000 - 8000 - found[0].amount.amount_minor
