"""Two transactions moving the same money at once, on PostgreSQL (SQLite serialises every
writer with ``BEGIN IMMEDIATE``, so only PostgreSQL can interleave them).

Each race is played deterministically: the first transaction does its work and is held
open; the second starts, and is released only once it is seen waiting on a row lock (or
has finished without waiting, which is the bug). The assertions are on the money.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

import pytest
import sqlalchemy as sa
from money_support import Desk, audit_ledger, balances
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import GateCommand
from parking_protocol.topics import TopicKind, TopicRef
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts import service as accounts
from server.accounts.models import Account, AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.errors import ConflictError
from server.gateways.models import GateCreate
from server.lots.models import Lot, LotCreate, TariffSchema
from server.payments import service as payments
from server.payments.models import Payment, RefundCreate, SessionPayRead
from server.sessions.flows import handle_scan
from server.sessions.models import ParkingSession

pytestmark = pytest.mark.postgres

HOURLY = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=None, currency="CNY")
T = TypeVar("T")
U = TypeVar("U")


@pytest.fixture
async def central(
    pg_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> AsyncIterator[Central]:
    service = build_central(make_settings(pg_url, mqtt_enabled=False), clock=clock)
    await service.start()
    try:
        seed(service)
        yield service
    finally:
        await service.stop()


def seed(central: Central) -> None:
    central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=HOURLY))
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="ann", name="Ann"))


@dataclass
class Outcome(Generic[T]):
    value: T | None = None
    error: Exception | None = None

    def get(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


@dataclass(frozen=True)
class Race(Generic[T, U]):
    first: Outcome[T]
    second: Outcome[U]
    second_waited: bool  # the second transaction was seen blocked on the first one's rows


def _run(work: Callable[[Session], T], outcome: Outcome[T], db: Session) -> None:
    try:
        outcome.value = work(db)
    except Exception as exc:
        outcome.error = exc


def _blocked_or_done(engine: sa.Engine, done: threading.Event, timeout_s: float = 15) -> bool:
    """Whether some backend of this database waits on a lock before ``done`` is set."""
    query = sa.text(
        "select count(*) from pg_stat_activity"
        " where datname = current_database() and wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done.is_set():
            return False
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() > 0:
                return True
        time.sleep(0.02)
    raise AssertionError("the second transaction neither finished nor waited on a lock")


def race(
    engine: sa.Engine, first: Callable[[Session], T], second: Callable[[Session], U]
) -> Race[T, U]:
    """Run ``first`` and hold its transaction open while ``second`` runs in another one."""
    first_out: Outcome[T] = Outcome()
    second_out: Outcome[U] = Outcome()
    held, release, second_done = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with Session(engine, expire_on_commit=False) as db:
            _run(first, first_out, db)
            held.set()
            assert release.wait(30), "never released"
            if first_out.error is None:
                db.commit()

    def follow() -> None:
        try:
            with Session(engine, expire_on_commit=False) as db:
                _run(second, second_out, db)
                if second_out.error is None:
                    db.commit()
        finally:
            second_done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30), "the first transaction never finished its work"
        follower = threading.Thread(target=follow)
        follower.start()
        waited = _blocked_or_done(engine, second_done)
    finally:
        release.set()
        holder.join(30)
    follower.join(30)
    assert not holder.is_alive() and not follower.is_alive()
    return Race(first_out, second_out, waited)


def settle_wallet(
    central: Central, clock: FakeClock, session_id: str, amount_minor: int
) -> Callable[[Session], payments.Settlement]:
    def run(db: Session) -> payments.Settlement:
        account = db.get(Account, "ann")
        assert account is not None
        return payments.settle(
            db,
            central.flow_config.payments,
            account=account,
            lot_id="lot1",
            session_id=session_id,
            amount=Money(amount_minor=amount_minor, currency="CNY"),
            key=f"race:{session_id}",
            now=clock.now(),
            allow_debt=False,
        )

    return run


async def test_two_settlements_of_one_wallet_never_overdraw_it(
    central: Central, clock: FakeClock
) -> None:
    central.topup("ann", 1000, idempotency_key="seed")

    done = race(
        central.engine,
        settle_wallet(central, clock, "s1", 1000),
        settle_wallet(central, clock, "s2", 1000),
    )

    assert done.first.get().status == "paid"
    assert done.second.get().status == "declined"  # it saw the first one's charge
    assert central.balance("ann") == 0
    assert done.second_waited
    audit_ledger(central)


def _stay_two_hours_in(central: Central, clock: FakeClock) -> Desk:
    central.topup("ann", 5000, idempotency_key="seed")
    desk = Desk(central, clock)
    desk.enter("ann")
    clock.advance(timedelta(hours=2))  # ¥10.00 by now
    return desk


def _prepay(central: Central, clock: FakeClock) -> Callable[[Session], SessionPayRead]:
    def run(db: Session) -> SessionPayRead:
        parking = db.exec(select(ParkingSession)).one()
        lot, account = db.get(Lot, "lot1"), db.get(Account, "ann")
        assert lot is not None and account is not None
        return payments.pay_open_session(
            db,
            central.flow_config.payments,
            lot=lot,
            parking=parking,
            account=account,
            method=None,
            key="app-1",
            now=clock.now(),
        )

    return run


def _exit_scan(central: Central, clock: FakeClock, desk: Desk) -> Callable[[Session], GateCommand]:
    event = desk.event("ann", Direction.EXIT)
    ref = TopicRef("lot1", "out1", TopicKind.EVENTS)

    def run(db: Session) -> GateCommand:
        reply = handle_scan(db, event, ref, now=clock.now(), config=central.flow_config)
        assert isinstance(reply.message, GateCommand)
        return reply.message

    return run


async def test_an_exit_scan_racing_a_payment_in_advance_sees_it_and_charges_nothing_more(
    central: Central, clock: FakeClock
) -> None:
    desk = _stay_two_hours_in(central, clock)

    done = race(central.engine, _prepay(central, clock), _exit_scan(central, clock, desk))

    assert done.first.get().amount.amount_minor == 1000
    gate = done.second.get()
    assert (gate.action, gate.reason) == (GateAction.OPEN, Reason.PAID)
    assert central.balance("ann") == 5000 - 1000  # the stay is paid once
    assert done.second_waited
    audit_ledger(central)


async def test_a_payment_in_advance_racing_the_exit_scan_is_refused_once_it_closed(
    central: Central, clock: FakeClock
) -> None:
    desk = _stay_two_hours_in(central, clock)

    done = race(central.engine, _exit_scan(central, clock, desk), _prepay(central, clock))

    gate = done.first.get()
    assert (gate.action, gate.amount) == (GateAction.OPEN, Money(amount_minor=1000, currency="CNY"))
    assert isinstance(done.second.error, ConflictError)
    assert central.balance("ann") == 5000 - 1000  # the stay is paid once
    assert done.second_waited
    audit_ledger(central)


async def test_two_refunds_of_one_stay_never_give_back_more_than_it_was_paid(
    central: Central, clock: FakeClock
) -> None:
    desk = _stay_two_hours_in(central, clock)
    paid = desk.exit("ann")
    assert paid.amount == Money(amount_minor=1000, currency="CNY")

    def refund(key: str) -> Callable[[Session], list[str]]:
        def run(db: Session) -> list[str]:
            parking = db.get(ParkingSession, paid.session_id)
            assert parking is not None
            refunds, _ = payments.refund_session(
                db,
                central.flow_config.payments,
                parking=parking,
                data=RefundCreate(reason="barrier fault", actor="op"),
                key=key,
                now=clock.now(),
            )
            return [r.refund_id for r in refunds]

        return run

    done = race(central.engine, refund("r1"), refund("r2"))

    assert len(done.first.get()) == 1
    assert isinstance(done.second.error, ConflictError)  # nothing left to refund
    assert central.balance("ann") == 5000
    assert balances(central)[("refunds:lot:lot1", "CNY")] == -1000
    assert done.second_waited
    audit_ledger(central)


async def test_a_top_up_racing_a_wallet_charge_collects_debts_only_from_money_left(
    central: Central, clock: FakeClock
) -> None:
    central.topup("ann", 1000, idempotency_key="seed")
    with central.db() as db:  # a ¥15.00 stay the wallet could not pay became a debt
        account = db.get(Account, "ann")
        assert account is not None
        owed = payments.settle(
            db,
            central.flow_config.payments,
            account=account,
            lot_id="lot1",
            session_id="old",
            amount=Money(amount_minor=1500, currency="CNY"),
            key="race:old",
            now=clock.now(),
            allow_debt=True,
        )
    assert owed.status == "owed"

    def topup(db: Session) -> int:
        outcome = accounts.topup(db, "ann", 500, idempotency_key="t2", now=clock.now())
        return outcome.response.collected_minor

    done = race(central.engine, settle_wallet(central, clock, "s1", 1000), topup)

    assert done.first.get().status == "paid"
    assert done.second.get() == 0  # ¥5.00 left: the ¥15.00 debt is not collected
    assert central.balance("ann") == 500
    assert central.get_account("ann").debt_minor == 1500
    assert done.second_waited
    audit_ledger(central)


async def test_the_same_key_settled_twice_at_once_pays_once_and_replays(
    central: Central, clock: FakeClock
) -> None:
    central.topup("ann", 5000, idempotency_key="seed")

    done = race(
        central.engine,
        settle_wallet(central, clock, "s1", 1000),
        settle_wallet(central, clock, "s1", 1000),
    )

    assert done.first.get().status == "paid"
    assert done.second.get().payment_id == done.first.get().payment_id  # a replay
    with Session(central.engine) as db:
        assert len(db.exec(select(Payment)).all()) == 1
    assert central.balance("ann") == 4000
    audit_ledger(central)
