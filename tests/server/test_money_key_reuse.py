"""A card capture whose answer was lost, retried once the price has moved: the provider key
stays bound to its first amount, the ledger books what the network really took, and the
stay still costs what it costs now (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from money_support import Desk, audit_ledger, sandbox
from sqlmodel import Session, col, select

from parking_protocol.clock import FakeClock
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import Account, AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.payments import service as payments
from server.payments.models import Payment, Refund, ValidationCreate
from server.sessions.models import ParkingSession

pytestmark = pytest.mark.usefixtures("database_url")

HOURLY = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=None, currency="CNY")


@pytest.fixture
async def central(
    database_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> AsyncIterator[Central]:
    service = build_central(make_settings(database_url, mqtt_enabled=False), clock=clock)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def desk(central: Central, clock: FakeClock) -> Desk:
    """Carol pays by card and has been parked two hours (¥10.00); her first exit's capture
    goes through but its answer is lost."""
    central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=HOURLY))
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="carol", name="Carol"))
    with central.db() as db:
        account = db.get(Account, "carol")
        assert account is not None
        account.payment_method, account.card_token = "card", "tok_ok"
    desk = Desk(central, clock)
    desk.enter("carol")
    clock.advance(timedelta(hours=2))
    sandbox(central).script("ok", "timeout_after")
    assert desk.exit("carol").reason == Reason.SERVICE_UNAVAILABLE
    return desk


def stay_money(central: Central) -> tuple[list[tuple[str, int]], list[int]]:
    """The open-or-closed stay's payments (key suffix after the session id, amount) and
    refunds, oldest first."""
    with Session(central.engine) as db:
        parking = db.exec(select(ParkingSession)).one()
        paid = db.exec(
            select(Payment)
            .where(Payment.session_id == parking.session_id)
            .order_by(col(Payment.created_at), col(Payment.amount_minor).desc())
        ).all()
        refunds = db.exec(select(Refund).where(Refund.session_id == parking.session_id)).all()
    prefix = f"exit:{parking.session_id}"
    return (
        [(p.idempotency_key.removeprefix(prefix), p.amount_minor) for p in paid],
        [r.amount_minor for r in refunds],
    )


async def test_a_lost_capture_retried_at_a_higher_price_books_it_and_takes_only_the_rest(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    clock.advance(timedelta(hours=1))  # ¥15.00 now

    paid = desk.exit("carol")

    assert (paid.action, paid.reason) == (GateAction.OPEN, Reason.PAID)
    assert paid.amount == Money(amount_minor=1500, currency="CNY")
    assert stay_money(central) == ([("", 1000), ("+", 500)], [])  # the first key, its amount
    assert sandbox(central).captured_minor() == 1500
    audit_ledger(central)


async def test_a_lost_capture_retried_after_a_discount_books_it_and_gives_the_excess_back(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    with central.db() as db:
        parking = db.exec(select(ParkingSession)).one()
        validation = ValidationCreate(kind="amount_off", value=400, reason="R1", merchant="Cafe")
        payments.add_validation(db, parking, validation, now=clock.now())

    paid = desk.exit("carol")

    assert paid.amount == Money(amount_minor=600, currency="CNY")
    assert stay_money(central) == ([("", 1000)], [400])
    assert sandbox(central).captured_minor() == 1000
    audit_ledger(central)


async def test_a_declined_remainder_books_nothing_and_the_next_scan_finds_both(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    clock.advance(timedelta(hours=1))
    sandbox(central).script("decline")  # the card refuses the extra ¥5.00

    denied = desk.exit("carol")

    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.INSUFFICIENT_BALANCE)
    assert stay_money(central) == ([], [])
    paid = desk.exit("carol")  # the first capture is found again under its key
    assert paid.reason == Reason.PAID
    assert stay_money(central) == ([("", 1000), ("+", 500)], [])
    assert sandbox(central).captured_minor() == 1500
    audit_ledger(central)
