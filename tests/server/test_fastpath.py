"""The batched fast path decides exactly as the ORM flow does.

The same seeded traffic — entries and exits, redelivered events, replayed and expired codes,
wrong gates, blocked and unknown drivers, a short wallet, a card payer, a permit holder, a
validated stay, a full lot, a lot that lets cars out owing, offline events to reconcile —
goes through two services on two databases, batch by batch, one with the fast path and one
with the ORM flow only. Every answer and the resulting books (stays, payments, ledger
balances, spent codes, stored answers) must be the same; the fast path must actually have
decided most of it, and must have handed the rest to the ORM flow, not failed.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    EventAck,
    GateCommand,
    OfflineDecision,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import issue_code
from parking_protocol.topics import TopicKind, gate_topic, parse_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, GateAction, Reason
from server.accounts.models import Account, AccountCreate, Posting
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.mqtt.bridge import Inbound
from server.payments import service as payments
from server.payments.models import Payment, PermitCreate, ValidationCreate
from server.sessions import fastpath
from server.sessions.models import ParkingSession, ProcessedEvent, UsedNonce

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
TARIFF = TariffSchema(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
GATES = {
    ("city", "in1"): Direction.ENTRY,
    ("city", "in2"): Direction.ENTRY,
    ("city", "out1"): Direction.EXIT,
    ("mall", "in"): Direction.ENTRY,
    ("mall", "out"): Direction.EXIT,
}
DRIVERS = [f"d{i}" for i in range(9)]
RICH = 100_000


@pytest.fixture
def two_urls(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> Iterator[tuple[str, str]]:
    """Two empty databases of the parametrized kind."""
    if database_url.startswith("sqlite"):
        yield database_url, f"sqlite:///{tmp_path / 'orm.db'}"
        return
    base = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield database_url, f"{base}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@dataclass
class Twin:
    central: Central
    clock: FakeClock


def _service(url: str, make_settings: Callable[..., ServerSettings], *, fast: bool) -> Twin:
    clock = FakeClock(START)
    settings = make_settings(url, event_fast_path=fast)
    central = build_central(settings, clock=clock, transport=InMemoryBroker().client("c"))
    asyncio.run(central.start())
    central.create_lot(LotCreate(lot_id="city", name="City", capacity=5, tariff=TARIFF))
    central.create_lot(
        LotCreate(
            lot_id="mall", name="Mall", capacity=50, tariff=TARIFF, payment_policy="pay_later"
        )
    )
    for (lot, gate), direction in GATES.items():
        central.create_gate(lot, GateCreate(gate_id=gate, direction=direction))
    for driver in DRIVERS:
        central.create_account(AccountCreate(account_id=driver, name=driver))
        amount = 300 if driver == "d5" else RICH
        central.topup(driver, amount, idempotency_key=f"start-{driver}")
    central.set_blocked("d6")
    with central.db() as db:
        card = db.get(Account, "d7")
        assert card is not None
        card.payment_method, card.card_token = "card", "tok_ok"
        db.add(card)
        payments.create_permit(
            db,
            PermitCreate(
                account_id="d4",
                lot_ids=["city"],
                valid_from=START,
                valid_until=START + timedelta(days=30),
            ),
            now=START,
        )
    return Twin(central, clock)


@pytest.fixture
def twins(
    two_urls: tuple[str, str], make_settings: Callable[..., ServerSettings]
) -> Iterator[tuple[Twin, Twin]]:
    fast = _service(two_urls[0], make_settings, fast=True)
    orm = _service(two_urls[1], make_settings, fast=False)
    try:
        assert fast.central.bridge is not None
        assert fast.central.bridge.fast_path is not None
        assert orm.central.bridge is not None
        assert orm.central.bridge.fast_path is None
        yield fast, orm
    finally:
        for twin in (fast, orm):
            asyncio.run(twin.central.stop())


class Traffic:
    """Seeded scans; the same objects go to both services."""

    def __init__(self, seed: int, central: Central) -> None:
        self.rng = random.Random(seed)
        self.key = central.keys.active
        self.seq: dict[tuple[str, str], int] = {}
        self.sent: list[ScanEvent] = []
        self.spent_codes: list[str] = []

    def code(self, driver: str, now: datetime) -> str:
        return issue_code(self.key.private_key, kid=self.key.kid, account_id=driver, now=now)

    def event(self, now: datetime) -> tuple[str, ScanEvent]:
        """A topic and an event: mostly sensible traffic, sometimes not."""
        rng = self.rng
        if self.sent and rng.random() < 0.08:  # a QoS 1 redelivery
            event = rng.choice(self.sent)
            return gate_topic(event.lot_id, event.gate_id, TopicKind.EVENTS), event
        lot, gate = rng.choice(list(GATES))
        driver = rng.choice([*DRIVERS, "nobody"])
        roll = rng.random()
        if roll < 0.12 and self.spent_codes:
            code = rng.choice(self.spent_codes[-30:])  # a screenshot
        elif roll < 0.15:
            code = self.code(driver, now - timedelta(minutes=20))  # long expired
        elif roll < 0.17:
            code = "not-a-code"
        else:
            code = self.code(driver, now)
        self.spent_codes.append(code)
        topic_gate = gate
        if rng.random() < 0.03:  # published on another gate's topic
            topic_gate = "in1" if gate != "in1" else "out1"
        direction = GATES[(lot, gate)]
        if rng.random() < 0.02:
            direction = Direction.EXIT if direction is Direction.ENTRY else Direction.ENTRY
        seq = self.seq[(lot, gate)] = self.seq.get((lot, gate), 0) + 1
        n = len(self.sent)
        offline = None
        if rng.random() < 0.06:  # a gateway that decided alone, reconciled now
            reason = Reason.WELCOME if direction is Direction.ENTRY else Reason.PAID
            offline = OfflineDecision(action=GateAction.OPEN, reason=reason, decided_at=now)
        event = ScanEvent(
            event_id=new_id(),
            lot_id=lot,
            gate_id=gate,
            seq=seq,
            boot=1,
            direction=direction,
            code=code,
            # Never two scans at one instant: stays entered together would be paired by
            # their (random) session ids, differently in the two services.
            scanned_at=now - timedelta(seconds=rng.choice([0, 0, 0, 3, 40]), microseconds=n),
            offline=offline,
        )
        self.sent.append(event)
        return gate_topic(lot, topic_gate, TopicKind.EVENTS), event


def _inbound(topic: str, event: ScanEvent) -> Inbound:
    ref = parse_topic(topic)
    assert ref is not None
    return Inbound(ref=ref, topic=topic, payload=encode(event), message=event)


def _answer(message: GateCommand | EventAck, names: dict[str, str]) -> tuple[Any, ...]:
    session = names.get(message.session_id or "", message.session_id)
    amount = message.amount.amount_minor if message.amount else None
    if isinstance(message, EventAck):
        return ("ack", message.event_id, message.result, amount, session)
    return (message.event_id, message.action, message.reason, message.display, amount, session)


def _stay_names(central: Central) -> dict[str, str]:
    """Session ids are random: name each stay by the event that began it."""
    with Session(central.engine) as db:
        return {s.session_id: s.entry_event_id for s in db.exec(select(ParkingSession)).all()}


def _books(central: Central) -> dict[str, Any]:
    names = _stay_names(central)
    with Session(central.engine) as db:
        stays = sorted(
            (
                s.entry_event_id,
                s.account_id,
                s.lot_id,
                s.state,
                s.entered_at,
                s.exit_event_id,
                s.exited_at,
                s.amount_minor,
                s.settlement,
                s.payment_method,
                s.tariff_version,
                re.sub(r"Permit [0-9a-f-]{36}", "Permit P", s.quote_json or ""),
                s.offline_entry,
                s.offline_exit,
                s.lost_ticket,
            )
            for s in db.exec(select(ParkingSession)).all()
        )
        paid = sorted(
            (
                _rename(p.idempotency_key, names),
                names.get(p.session_id or "", p.session_id),
                p.account_id,
                p.method,
                p.status,
                p.amount_minor,
                p.created_at,
            )
            for p in db.exec(select(Payment)).all()
        )
        balances = dict(
            db.exec(
                select(Posting.ledger_account, sa.func.sum(Posting.amount_minor)).group_by(
                    Posting.ledger_account
                )
            ).all()
        )
        spent = sorted((n.nonce, n.event_id) for n in db.exec(select(UsedNonce)).all())
        answered = {}
        for done in db.exec(select(ProcessedEvent)).all():
            message = decode(done.reply_json)
            assert isinstance(message, GateCommand | EventAck)
            answered[done.event_id] = _answer(message, names)
    return {
        "stays": stays,
        "payments": paid,
        "balances": balances,
        "spent": spent,
        "answers": answered,
    }


def _rename(key: str, names: dict[str, str]) -> str:
    for session_id, name in names.items():
        key = key.replace(session_id, name)
    return key


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_fast_path_decides_exactly_as_the_orm_flow(twins: tuple[Twin, Twin], seed: int) -> None:
    fast, orm = twins
    traffic = Traffic(seed, fast.central)
    replies: dict[str, list[tuple[Any, ...]]] = {"fast": [], "orm": []}
    validated = False
    for round_ in range(40):
        now = fast.clock.now()
        batch = [_inbound(*traffic.event(now)) for _ in range(traffic.rng.randint(1, 25))]
        for name, twin in (("fast", fast), ("orm", orm)):
            assert twin.clock.now() == now
            bridge = twin.central.bridge
            assert bridge is not None
            out = bridge.process_batch(batch)
            names = _stay_names(twin.central)
            replies[name].append(tuple(_answer(r.message, names) for r in out))
        if round_ == 10 and not validated:
            # A merchant validates whoever of d0..d3 is inside the city lot now (the same
            # drivers are inside in both): those stays must go to the ORM flow at exit.
            for twin in (fast, orm):
                with twin.central.db() as db:
                    for stay in db.exec(
                        select(ParkingSession).where(
                            ParkingSession.lot_id == "city",
                            ParkingSession.state == "open",
                            col(ParkingSession.account_id).in_(["d0", "d1", "d2", "d3"]),
                        )
                    ).all():
                        payments.add_validation(
                            db,
                            stay,
                            ValidationCreate(
                                kind="time_off", value=30, reason="cinema", merchant="M"
                            ),
                            now=now,
                        )
                        validated = True
        step = timedelta(minutes=traffic.rng.choice([1, 7, 25, 70]))
        fast.clock.advance(step)
        orm.clock.advance(step)

    for number, (ours, theirs) in enumerate(zip(replies["fast"], replies["orm"], strict=True)):
        for one, other in zip(ours, theirs, strict=True):
            assert one == other, f"batch {number}: fast path {one}, ORM flow {other}"
    fast_books, orm_books = _books(fast.central), _books(orm.central)
    for part in fast_books:
        assert fast_books[part] == orm_books[part], part
    assert sum(fast_books["balances"].values()) == 0  # the ledger balances
    stats = fast.central.stats
    assert stats.fast_fallbacks == 0
    assert stats.fast > stats.events / 2, (stats.fast, stats.events)
    assert stats.events == orm.central.stats.events
    opened = [a for batch in replies["fast"] for a in batch if a[1] is GateAction.OPEN]
    assert len(opened) > 30  # the traffic really parks and pays
    reasons = {a[2] for batch in replies["fast"] for a in batch if len(a) == 6}
    assert {Reason.WELCOME, Reason.PAID, Reason.CODE_REPLAYED} <= reasons, reasons


COMMUTERS = ["d0", "d1", "d2", "d3", "d8"]
CITY_GATES = {"in1": Direction.ENTRY, "in2": Direction.ENTRY, "out1": Direction.EXIT}


@dataclass
class _Held:
    """A scan a gate could not deliver yet."""

    event: ScanEvent
    resend_offline: bool  # sent live, but the lane opened on its own: sent again with that


class Commute:
    """Drivers going in and out of the city lot while its gates lose their links.

    A gate with its link up delivers each scan at once and the service's answer moves the
    car; a gate with its link down opens on its own and keeps the scan (with that decision)
    until the link is back; a gate whose link hangs delivers the live scan late, after its
    lane gave up waiting and opened on its own, then sends it again with that decision.
    Whatever the order, both services must agree, and at the end every car outside has no
    open stay and every exit belongs to exactly one stay.
    """

    def __init__(self, seed: int, central: Central) -> None:
        self.rng = random.Random(seed)
        self.key = central.keys.active
        self.seq: dict[str, int] = {}
        self.inside: dict[str, bool] = dict.fromkeys(COMMUTERS, False)
        self.busy: set[str] = set()  # a car at a gate whose scan is held
        self.down: dict[str, str] = {}  # gate -> "cut" | "hang"
        self.held: dict[str, list[_Held]] = {gate: [] for gate in CITY_GATES}
        self.exits: list[str] = []  # event ids of every exit a barrier opened for
        self.n = 0
        self.kept = {"cut": 0, "hang": 0}  # scans held by a gate, by what its link did

    def _event(self, gate: str, driver: str, at: datetime, *, offline: bool) -> ScanEvent:
        direction = CITY_GATES[gate]
        seq = self.seq[gate] = self.seq.get(gate, 0) + 1
        self.n += 1
        decision = None
        if offline:
            reason = Reason.WELCOME if direction is Direction.ENTRY else Reason.PAID
            decision = OfflineDecision(action=GateAction.OPEN, reason=reason, decided_at=at)
        return ScanEvent(
            event_id=new_id(),
            lot_id="city",
            gate_id=gate,
            seq=seq,
            boot=1,
            direction=direction,
            code=issue_code(self.key.private_key, kid=self.key.kid, account_id=driver, now=at),
            scanned_at=at - timedelta(microseconds=self.n),
            offline=decision,
        )

    def links(self) -> list[ScanEvent]:
        """Links go down and come back; what a healed gate held is delivered now."""
        out: list[ScanEvent] = []
        for gate in CITY_GATES:
            if gate in self.down and self.rng.random() < 0.3:
                del self.down[gate]
                for held in self.held[gate]:
                    out.append(held.event)
                    if held.resend_offline:
                        out.append(self._offline_copy(held.event))
                self.held[gate] = []
            elif gate not in self.down and self.rng.random() < 0.15:
                self.down[gate] = self.rng.choice(["cut", "hang"])
        self.busy.clear()
        return out

    @staticmethod
    def _offline_copy(event: ScanEvent) -> ScanEvent:
        reason = Reason.WELCOME if event.direction is Direction.ENTRY else Reason.PAID
        decision = OfflineDecision(
            action=GateAction.OPEN, reason=reason, decided_at=event.scanned_at
        )
        return event.model_copy(update={"offline": decision})

    def scans(self, now: datetime) -> list[tuple[str, ScanEvent]]:
        """This round's scans: (driver, event) of cars whose gate is up, delivered live;
        the others are held by their gate and the car goes through."""
        live: list[tuple[str, ScanEvent]] = []
        for driver in COMMUTERS:
            if self.rng.random() < 0.5:
                continue
            gate = "out1" if self.inside[driver] else self.rng.choice(["in1", "in2"])
            at = now + timedelta(seconds=self.rng.randint(0, 50))
            link = self.down.get(gate)
            if link is None:
                live.append((driver, self._event(gate, driver, at, offline=False)))
                continue
            event = self._event(gate, driver, at, offline=link == "cut")
            self.held[gate].append(_Held(event, resend_offline=link == "hang"))
            self.kept[link] += 1
            self.passed(driver, event)
        return live

    def passed(self, driver: str, event: ScanEvent) -> None:
        self.inside[driver] = event.direction is Direction.ENTRY
        if event.direction is Direction.EXIT:
            self.exits.append(event.event_id)

    def heal(self) -> list[ScanEvent]:
        out: list[ScanEvent] = []
        for gate in CITY_GATES:
            for held in self.held[gate]:
                out.append(held.event)
                if held.resend_offline:
                    out.append(self._offline_copy(held.event))
            self.held[gate] = []
        self.down.clear()
        return out


def _topic(event: ScanEvent) -> str:
    return gate_topic(event.lot_id, event.gate_id, TopicKind.EVENTS)


@pytest.mark.parametrize("seed", range(1, 4))  # 80 ran clean once on SQLite
def test_the_fast_path_agrees_when_gates_lose_their_links(
    twins: tuple[Twin, Twin], seed: int
) -> None:
    fast, orm = twins
    commute = Commute(seed, fast.central)

    def deliver(events: list[ScanEvent], number: int) -> list[Any]:
        batch = [_inbound(_topic(e), e) for e in events]
        answers: list[Any] = []
        for name, twin in (("fast", fast), ("orm", orm)):
            bridge = twin.central.bridge
            assert bridge is not None
            out = bridge.process_batch(batch)
            names = _stay_names(twin.central)
            got = [_answer(r.message, names) for r in out]
            if name == "fast":
                answers = got
                replies = out
            else:
                for one, other in zip(answers, got, strict=True):
                    assert one == other, f"batch {number}: fast path {one}, ORM flow {other}"
        return replies

    for round_ in range(60):
        now = fast.clock.now()
        late = commute.links()
        live = commute.scans(now)
        by_event = {event.event_id: driver for driver, event in live}
        events = [event for _, event in live] + late
        commute.rng.shuffle(events)
        for reply in deliver(events, round_):
            message = reply.message
            driver = by_event.get(message.event_id)
            if (
                driver is not None
                and isinstance(message, GateCommand)
                and message.action is GateAction.OPEN
            ):
                event = next(e for d, e in live if e.event_id == message.event_id)
                commute.passed(driver, event)
        step = timedelta(minutes=commute.rng.choice([1, 3, 10, 30]))
        fast.clock.advance(step)
        orm.clock.advance(step)
    deliver(commute.heal(), 60)

    fast_books, orm_books = _books(fast.central), _books(orm.central)
    for part in fast_books:
        assert fast_books[part] == orm_books[part], part
    assert sum(fast_books["balances"].values()) == 0
    assert fast.central.stats.fast_fallbacks == 0
    assert fast.central.stats.fast > 0
    assert min(commute.kept.values()) > 0, commute.kept  # both kinds of fault happened
    with Session(fast.central.engine) as db:
        stays = db.exec(select(ParkingSession).where(ParkingSession.lot_id == "city")).all()
        for driver in COMMUTERS:
            open_ = [s for s in stays if s.account_id == driver and s.state == "open"]
            assert len(open_) == int(commute.inside[driver]), (driver, open_)
        closed_by = [s.exit_event_id for s in stays if s.state == "closed"]
        assert sorted(e for e in closed_by if e is not None) == sorted(commute.exits)


def _answers_of_both(fast: Twin, orm: Twin, batch: list[Inbound]) -> dict[str, list[Any]]:
    """The same batch through both services: each one's answers, stays named alike."""
    answers = {}
    for name, twin in (("fast", fast), ("orm", orm)):
        bridge = twin.central.bridge
        assert bridge is not None
        out = bridge.process_batch(batch)
        answers[name] = [_answer(r.message, _stay_names(twin.central)) for r in out]
    return answers


@pytest.mark.parametrize("first", ["online", "offline"])
def test_a_fast_run_that_fails_after_writing_leaves_nothing_and_the_orm_flow_decides(
    twins: tuple[Twin, Twin], monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The run writes part of its rows, then fails (a bug, a lost race): its writes are undone
    (the whole transaction when the run began it, else its SAVEPOINT) and the ORM flow
    decides the same events once, as if the fast path had never run."""
    fast, orm = twins
    traffic = Traffic(5, fast.central)
    now = fast.clock.now()

    def scan(driver: str, gate: str, offline: bool = False) -> Inbound:
        direction = GATES[("city", gate)]
        decision = None
        if offline:
            decision = OfflineDecision(
                action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=now
            )
        event = ScanEvent(
            event_id=new_id(),
            lot_id="city",
            gate_id=gate,
            seq=1,
            boot=1,
            direction=direction,
            code=traffic.code(driver, now),
            scanned_at=now - timedelta(seconds=len(traffic.sent) + 1),
            offline=decision,
        )
        traffic.sent.append(event)
        return _inbound(gate_topic("city", gate, TopicKind.EVENTS), event)

    batch = [scan("d0", "in1"), scan("d1", "in2"), scan("d2", "in1")]
    if first == "offline":
        batch.insert(0, scan("d3", "in2", offline=True))

    def broken(conn: Any, rows: Any) -> None:
        raise RuntimeError("a bug after writing the stays and the spent codes")

    # The stays and the spent codes are written; the answers never are.
    monkeypatch.setattr(fastpath._P_INSERT[ProcessedEvent.__tablename__], "many", broken)
    answers = _answers_of_both(fast, orm, batch)
    assert answers["fast"] == answers["orm"]
    assert [a[1] for a in answers["fast"][-3:]] == [GateAction.OPEN] * 3
    assert _books(fast.central) == _books(orm.central)
    assert fast.central.stats.fast_fallbacks == 1
    assert fast.central.stats.fast == 0
