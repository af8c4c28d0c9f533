"""Two transactions moving the same money at once, on PostgreSQL (SQLite serialises every
writer with ``BEGIN IMMEDIATE``, so only PostgreSQL can interleave them).

Each race is played deterministically: the first transaction does its work and is held
open; the second starts, and is released only once it is seen waiting on a row lock (or
has finished without waiting, which is the bug). The assertions are on the money.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Generic, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from api_support import API_TOKEN, AUTH
from fastapi import FastAPI
from money_support import Desk, audit_ledger, balances
from sqlmodel import Session, col, select

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
from server.main import create_app
from server.payments import service as payments
from server.payments.models import Payment, RefundCreate, SessionPayRead
from server.payments.provider import SandboxCardProvider
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


def race_in_between(
    engine: sa.Engine,
    first_begins: Callable[[Session], object],
    second: Callable[[Session], U],
    first_ends: Callable[[Session], T],
) -> Race[T, U]:
    """``first_begins``, then ``second`` in another transaction until it waits on a lock (or
    ends), then ``first_ends`` in the first transaction: two paths interleaved at the point
    where an inverted lock order deadlocks (PostgreSQL then aborts one of them)."""
    first_out: Outcome[T] = Outcome()
    second_out: Outcome[U] = Outcome()
    held, release, second_done = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with Session(engine, expire_on_commit=False) as db:
            begun: Outcome[object] = Outcome()
            _run(first_begins, begun, db)
            held.set()
            assert release.wait(30), "never released"
            if begun.error is not None:
                first_out.error = begun.error
                return
            _run(first_ends, first_out, db)
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
        assert held.wait(30), "the first transaction never began its work"
        follower = threading.Thread(target=follow)
        follower.start()
        waited = _blocked_or_done(engine, second_done)
    finally:
        release.set()
        holder.join(30)
    follower.join(30)
    assert not holder.is_alive() and not follower.is_alive()
    return Race(first_out, second_out, waited)


def _use_card(central: Central) -> None:
    with central.db() as db:
        account = db.get(Account, "ann")
        assert account is not None
        account.payment_method, account.card_token = "card", "tok_ok"


def _stay_paid_in_part_then_owed(central: Central, clock: FakeClock) -> tuple[Desk, str]:
    """Ann's stay in a pay-later lot: ¥5.00 paid in advance, then ¥10.00 left owed at the exit
    (the wallet, or the card, refused it). Returns the desk and the stay's id."""
    with central.db() as db:
        lot = db.get(Lot, "lot1")
        assert lot is not None
        lot.payment_policy = "pay_later"
    desk = Desk(central, clock)
    desk.enter("ann")
    clock.advance(timedelta(hours=1))
    prepaid = _prepay(central, clock)
    with central.db() as db:
        assert prepaid(db).amount.amount_minor == 500
    clock.advance(timedelta(hours=2))
    card = central.flow_config.payments.card
    if isinstance(card, SandboxCardProvider):
        card.script("decline")
    owed = desk.exit("ann")
    assert (owed.action, owed.reason) == (GateAction.OPEN, Reason.INSUFFICIENT_BALANCE)
    assert owed.session_id is not None
    assert central.get_account("ann").debt_minor == 1000
    return desk, owed.session_id


def _lock_stay_row(session_id: str) -> Callable[[Session], object]:
    """What a refund does first: lock the stay's row."""

    def run(db: Session) -> object:
        return db.exec(
            select(ParkingSession).where(ParkingSession.session_id == session_id).with_for_update()
        ).one()

    return run


def _refund_all(central: Central, clock: FakeClock, session_id: str) -> Callable[[Session], int]:
    def run(db: Session) -> int:
        parking = db.get(ParkingSession, session_id)
        assert parking is not None
        refunds, _ = payments.refund_session(
            db,
            central.flow_config.payments,
            parking=parking,
            data=RefundCreate(reason="charged in error", actor="op"),
            key="refund-1",
            now=clock.now(),
        )
        return sum(r.amount.amount_minor for r in refunds)

    return run


async def test_a_refund_of_a_stay_with_a_debt_racing_a_top_up_does_not_deadlock(
    central: Central, clock: FakeClock
) -> None:
    """The refund holds the stay and wants the account; the top-up collecting that stay's
    debt must take the stay before the account, not the other way round."""
    central.topup("ann", 500, idempotency_key="seed")
    _desk, session_id = _stay_paid_in_part_then_owed(central, clock)
    assert central.balance("ann") == 0

    def topup(db: Session) -> int:
        outcome = accounts.topup(db, "ann", 2000, idempotency_key="t2", now=clock.now())
        return outcome.response.collected_minor

    done = race_in_between(
        central.engine,
        _lock_stay_row(session_id),
        topup,
        _refund_all(central, clock, session_id),
    )

    assert done.first.get() == 500  # the payment in advance went back to the wallet
    assert done.second.get() == 1000  # then the top-up paid off the stay's debt
    assert central.balance("ann") == 500 + 2000 - 1000
    assert central.get_account("ann").debt_minor == 0
    assert done.second_waited
    audit_ledger(central)


async def test_a_card_exit_collecting_a_debt_racing_a_refund_of_its_stay_does_not_deadlock(
    central: Central, clock: FakeClock
) -> None:
    """The exit of a later stay pays by card and collects the earlier stay's debt (updating
    that stay) while the earlier stay is refunded: stays first, then the account."""
    _use_card(central)
    desk, session_id = _stay_paid_in_part_then_owed(central, clock)
    desk.enter("ann")
    clock.advance(timedelta(hours=1))

    done = race_in_between(
        central.engine,
        _lock_stay_row(session_id),
        _exit_scan(central, clock, desk),
        _refund_all(central, clock, session_id),
    )

    assert done.first.get() == 500  # the card payment in advance went back to the card
    gate = done.second.get()
    assert (gate.action, gate.reason) == (GateAction.OPEN, Reason.PAID)
    assert central.get_account("ann").debt_minor == 0  # collected by the exit's card charge
    assert done.second_waited
    audit_ledger(central)


@pytest.fixture
def api_app(pg_url: str, tmp_path: Path, clock: FakeClock) -> FastAPI:
    settings = ServerSettings(
        database_url=pg_url,
        key_file=tmp_path / "keys" / "k.pem",
        mqtt_enabled=False,
        bootstrap_api_token=API_TOKEN,
    )
    return create_app(settings, clock=clock)


async def test_a_refund_the_database_aborts_in_a_deadlock_is_a_503_to_retry_not_a_500(
    api_app: FastAPI, clock: FakeClock
) -> None:
    """Another transaction (here plain SQL, locking the other way round) deadlocks with the
    refund; PostgreSQL aborts the refund: the operator is told to retry, and the retry
    with the same key refunds once."""
    async with api_app.router.lifespan_context(api_app):
        central: Central = api_app.state.central
        seed(central)
        desk = _stay_two_hours_in(central, clock)
        paid = desk.exit("ann")
        transport = httpx.ASGITransport(app=api_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=AUTH
        ) as client:
            url = f"/api/v1/sessions/{paid.session_id}/refunds"
            body = {"reason": "barrier fault"}
            other = central.engine.connect()
            try:
                other.exec_driver_sql("SET deadlock_timeout = '20s'")  # the refund is the victim
                account = sa.select(Account).where(col(Account.account_id) == "ann")
                other.execute(account.with_for_update())
                refund = asyncio.create_task(
                    client.post(url, json=body, headers={"Idempotency-Key": "r1"})
                )
                waiting = threading.Event()
                assert await asyncio.to_thread(
                    _blocked_or_done, central.engine, waiting
                )  # the refund holds the stay and waits for the account
                stay = sa.select(ParkingSession).where(
                    col(ParkingSession.session_id) == paid.session_id
                )
                await asyncio.to_thread(other.execute, stay.with_for_update())
                answer = await refund
            finally:
                other.rollback()
                other.close()

            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "1"
            assert "same Idempotency-Key" in answer.json()["detail"]
            assert central.balance("ann") == 5000 - 1000  # nothing was refunded
            retried = await client.post(url, json=body, headers={"Idempotency-Key": "r1"})
            assert retried.status_code == 201, retried.text
            assert central.balance("ann") == 5000
        audit_ledger(central)
