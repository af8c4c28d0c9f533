"""Whole histories, on SQLite and PostgreSQL: replaying every event again changes nothing,
replaying the history into a fresh database gives the same ledger, and randomised sequences
of entries, exits, duplicates, top-ups, declines and refunds keep the books right."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from money_support import Desk, audit_ledger, balances, ledger_shape, sandbox
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import EventAck, GateCommand, ScanEvent
from parking_protocol.types import Direction, GateAction
from server.accounts.models import Account, AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.errors import DomainError
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.payments import service as payments
from server.payments.models import RefundCreate
from server.pricing.models import TariffSpec
from server.sessions.models import ParkingSession

pytestmark = pytest.mark.usefixtures("database_url")

DRIVERS = ("ann", "ben", "cat", "dan")
TOKENS = ("tok_ok", "tok_decline", "tok_timeout", "tok_capture_fail", "tok_refund_fail")
TARIFF = TariffSpec(
    grace_minutes=10, increment_minutes=30, increment_minor=250, lost_ticket_minor=3000
)


def schema(database_url: str) -> str:
    """A fresh schema next to the test's own (dropped with the test database)."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(database_url.split("?", maxsplit=1)[0], isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    engine.dispose()
    return name


@pytest.fixture
def make_central(
    database_url: str, make_settings: Callable[..., ServerSettings]
) -> Callable[[FakeClock, str], Central]:
    def make(clock: FakeClock, url: str = database_url) -> Central:
        return build_central(make_settings(url, mqtt_enabled=False), clock=clock)

    return make


@pytest.fixture
async def central(
    make_central: Callable[[FakeClock, str], Central], clock: FakeClock, database_url: str
) -> AsyncIterator[Central]:
    service = make_central(clock, database_url)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def provision(central: Central, policy: str) -> None:
    central.create_lot(
        LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=TARIFF, payment_policy=policy)  # type: ignore[arg-type]
    )
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    for name in DRIVERS:
        central.create_account(AccountCreate(account_id=name, name=name))
        central.topup(name, 2000, idempotency_key=f"{name}-opening")


@dataclass
class Step:
    """One thing that happened, replayable: an event, a top-up, a card change, a refund."""

    at: object
    kind: str
    event: ScanEvent | None = None
    account_id: str = ""
    amount: int = 0
    key: str = ""
    exit_event_id: str = ""  # names a closed stay in any database the history is replayed in


@dataclass
class Scenario:
    central: Central
    clock: FakeClock
    rng: random.Random
    desk: Desk = field(init=False)
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.desk = Desk(self.central, self.clock)

    def apply(self, step: Step) -> None:
        """Do one step (first time or replayed) exactly as it was first done."""
        central = self.central
        self.clock.set(step.at) if hasattr(self.clock, "set") else None
        if step.kind == "event":
            assert step.event is not None
            self.desk.deliver(step.event, at=step.at)  # type: ignore[arg-type]
        elif step.kind == "topup":
            central.topup(step.account_id, step.amount, idempotency_key=step.key)
        elif step.kind == "card":
            with central.db() as db:
                account = db.get(Account, step.account_id)
                assert account is not None
                account.payment_method = "wallet" if step.key == "wallet" else "card"
                account.card_token = None if step.key == "wallet" else step.key
                db.add(account)
        elif step.kind == "refund":
            with central.db() as db:
                parking = db.exec(
                    select(ParkingSession).where(ParkingSession.exit_event_id == step.exit_event_id)
                ).one()
                payments.refund_session(
                    db,
                    central.flow_config.payments,
                    parking=parking,
                    data=RefundCreate(amount_minor=step.amount, reason="random refund"),
                    key=step.key,
                    now=step.at,  # type: ignore[arg-type]
                )

    def record(self, step: Step) -> None:
        self.steps.append(step)
        self.apply(step)

    def random_step(self) -> None:
        rng, now = self.rng, self.clock.now()
        roll = rng.random()
        name = rng.choice(DRIVERS)
        if roll < 0.3:
            event = self.desk.event(name, Direction.ENTRY)
            self.record(Step(now, "event", event=event))
        elif roll < 0.6:
            event = self.desk.event(name, Direction.EXIT)
            self.record(Step(now, "event", event=event))
        elif roll < 0.7 and self.steps:
            earlier = [s for s in self.steps if s.kind == "event"]
            if earlier:  # a QoS 1 redelivery of some earlier event
                self.record(Step(now, "event", event=rng.choice(earlier).event))
        elif roll < 0.8:
            key = f"t-{rng.randrange(6)}-{name}"  # keys repeat: retried top-ups
            amount = 300 if key.startswith("t-0") else rng.choice([500, 2000, 5000])
            try:
                self.record(Step(now, "topup", account_id=name, amount=amount, key=key))
            except DomainError:
                self.steps.pop()  # same key, other amount: refused (422)
        elif roll < 0.88:
            self.record(Step(now, "card", account_id=name, key=rng.choice((*TOKENS, "wallet"))))
        else:
            closed = [
                s
                for s in self.central.list_sessions(state="closed")
                if (s.settlement == "paid" and s.amount and s.amount.amount_minor)
                or rng.random() < 0.1
            ]
            if closed:
                target = rng.choice(closed)
                amount = rng.choice([100, 250, 400, 10_000])
                with Session(self.central.engine) as db:
                    row = db.get(ParkingSession, target.session_id)
                    assert row is not None and row.exit_event_id is not None
                    exit_event_id = row.exit_event_id
                step = Step(
                    now,
                    "refund",
                    amount=amount,
                    key=f"r-{rng.randrange(8)}",
                    exit_event_id=exit_event_id,
                )
                try:
                    self.record(step)
                except DomainError:
                    # more than was paid, nothing paid yet, a failing provider: refused whole,
                    # nothing happened, so it is not part of the history (the key stays free)
                    self.steps.pop()
        self.clock.advance(timedelta(minutes=rng.choice([1, 7, 25, 70, 200])))


def run(central: Central, clock: FakeClock, seed: int, steps: int) -> Scenario:
    scenario = Scenario(central, clock, random.Random(seed))
    for _ in range(steps):
        scenario.random_step()
    return scenario


@pytest.mark.parametrize("policy", ["pay_on_exit", "pay_later"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_histories_keep_the_ledger_balanced_and_wallets_right(
    central: Central, clock: FakeClock, policy: str, seed: int
) -> None:
    provision(central, policy)

    scenario = run(central, clock, seed, steps=120)

    audit_ledger(central)
    kinds = {s.kind for s in scenario.steps}
    assert {"event", "topup", "card", "refund"} <= kinds
    closed = central.list_sessions(state="closed")
    assert closed, "the scenario never closed a stay"
    if policy == "pay_later":
        assert all(s.state == "closed" or s.exited_at is None for s in central.list_sessions())
    # every closed stay with a price was paid, owed or (in a pay-on-exit lot) fully paid
    for parking in closed:
        if parking.amount and parking.amount.amount_minor and not parking.prepaid_minor:
            assert parking.settlement in ("paid", "owed")
            if policy == "pay_on_exit" and not parking.offline_exit:
                assert parking.settlement == "paid"


async def test_replaying_the_whole_history_twice_changes_nothing(
    central: Central, clock: FakeClock
) -> None:
    provision(central, "pay_later")
    scenario = run(central, clock, seed=7, steps=100)
    before_balances, before_ledger = balances(central), ledger_shape(central)
    captured = sandbox(central).captured_minor()
    for _ in range(2):
        for step in scenario.steps:
            scenario.apply(step)

    assert balances(central) == before_balances
    assert ledger_shape(central) == before_ledger
    assert sandbox(central).captured_minor() == captured
    audit_ledger(central)


async def test_the_same_history_in_a_fresh_database_gives_the_same_books(
    central: Central,
    clock: FakeClock,
    make_central: Callable[[FakeClock, str], Central],
    tmp_path: object,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    provision(central, "pay_on_exit")
    start = clock.now()
    scenario = run(central, clock, seed=11, steps=100)
    if database_url.startswith("postgresql"):
        other_url = (
            database_url.split("?", maxsplit=1)[0]
            + f"?options={quote('-csearch_path=' + schema(database_url))}"
        )
    else:
        other_url = database_url.replace("qrpark.db", "replica.db")
    replica_clock = FakeClock(start)
    replica = make_central(replica_clock, other_url)
    await replica.start()
    try:
        provision(replica, "pay_on_exit")
        sandbox(replica).script()  # the same sandbox rules: outcomes follow the card tokens
        again = Scenario(replica, replica_clock, random.Random(0))
        for step in scenario.steps:
            again.apply(step)

        assert balances(replica) == balances(central)
        assert ledger_shape(replica) == ledger_shape(central)
        audit_ledger(replica)
    finally:
        await replica.stop()


async def test_replies_to_redelivered_events_are_the_stored_ones(
    central: Central, clock: FakeClock
) -> None:
    provision(central, "pay_on_exit")
    central.topup("ann", 5000, idempotency_key="seed")
    desk = Desk(central, clock)
    entry = desk.event("ann", Direction.ENTRY)
    first = desk.deliver(entry)
    clock.advance(timedelta(hours=2))
    exit_ = desk.event("ann", Direction.EXIT)
    paid = desk.deliver(exit_)

    replies: list[GateCommand | EventAck] = [desk.deliver(entry), desk.deliver(exit_)]

    assert replies == [first, paid]
    assert isinstance(paid, GateCommand)
    assert paid.action == GateAction.OPEN
    assert central.balance("ann") == 2000 + 5000 - 1000
