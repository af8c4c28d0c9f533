"""A card capture whose answer was lost, retried once the price has moved: the provider key
stays bound to its first amount, the ledger books every capture the network confirmed (even
when the rest is refused), debts get keys no other amount is bound to, and the stay still
costs what it costs now (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from money_support import Desk, audit_ledger, sandbox
from sqlmodel import Session, col, select

from parking_protocol.clock import FakeClock
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import Account, AccountCreate
from server.central import Central
from server.gateways.models import GateCreate
from server.lots.models import Lot, LotCreate, TariffSchema
from server.payments import service as payments
from server.payments.models import Payment, Refund, ValidationCreate
from server.payments.provider import CardOutcome
from server.sessions.models import ParkingSession

pytestmark = pytest.mark.usefixtures("database_url")

HOURLY = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=None, currency="CNY")


@pytest.fixture
def central(central_without_mqtt: Central) -> Central:
    return central_without_mqtt


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


def stay_prepaid(central: Central) -> int:
    with Session(central.engine) as db:
        return db.exec(select(ParkingSession)).one().prepaid_minor


def use(central: Central, method: str, card_token: str | None = None) -> None:
    with central.db() as db:
        account = db.get(Account, "carol")
        assert account is not None
        account.payment_method, account.card_token = method, card_token


def pay_later(central: Central) -> None:
    with central.db() as db:
        lot = db.get(Lot, "lot1")
        assert lot is not None
        lot.payment_policy = "pay_later"


async def test_a_declined_remainder_books_the_first_capture_toward_the_stay(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    clock.advance(timedelta(hours=1))
    sandbox(central).script("decline")  # the card refuses the extra ¥5.00

    denied = desk.exit("carol")

    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.INSUFFICIENT_BALANCE)
    assert stay_money(central) == ([("", 1000)], [])  # what the card took is booked ...
    assert stay_prepaid(central) == 1000  # ... and counts as paid in advance
    paid = desk.exit("carol")  # the card again: only the rest, under a key of its own
    assert (paid.reason, paid.amount) == (Reason.PAID, Money(amount_minor=500, currency="CNY"))
    payments_of_stay, refunds = stay_money(central)
    assert [amount for _key, amount in payments_of_stay] == [1000, 500]
    assert refunds == []
    assert sandbox(central).captured_minor() == 1500
    audit_ledger(central)


async def test_after_a_declined_remainder_the_wallet_pays_only_the_rest(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    clock.advance(timedelta(hours=1))
    sandbox(central).script("decline")
    assert desk.exit("carol").reason == Reason.INSUFFICIENT_BALANCE
    use(central, "wallet")
    central.topup("carol", 2000, idempotency_key="top-1")

    paid = desk.exit("carol")

    assert (paid.reason, paid.amount) == (Reason.PAID, Money(amount_minor=500, currency="CNY"))
    assert central.balance("carol") == 1500  # not the whole ¥15.00 again
    assert sandbox(central).captured_minor() == 1000
    audit_ledger(central)


async def test_a_failed_completion_owes_the_price_under_a_fresh_key_collected_later(
    central: Central, clock: FakeClock
) -> None:
    """The first attempt's authorisation went through unheard and its capture never ran:
    completing it fails, so the whole price is owed, under a key no amount is bound to, and
    the next card charge collects it and the debts after it."""
    central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=HOURLY))
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="carol", name="Carol"))
    use(central, "card", "tok_ok")
    desk, card = Desk(central, clock), sandbox(central)
    desk.enter("carol")
    clock.advance(timedelta(hours=2))
    card.script("timeout_after")  # the authorisation of ¥10.00 is held, its answer lost
    assert desk.exit("carol").reason == Reason.SERVICE_UNAVAILABLE
    pay_later(central)
    clock.advance(timedelta(hours=1))
    card.script("error")  # completing the ¥10.00 capture fails

    owed = desk.exit("carol")

    assert (owed.action, owed.reason) == (GateAction.OPEN, Reason.INSUFFICIENT_BALANCE)
    with Session(central.engine) as db:
        debt = db.exec(select(Payment).where(Payment.status == "owed")).one()
    assert (debt.idempotency_key, debt.amount_minor) == (f"exit:{owed.session_id}+", 1500)
    desk.enter("carol")  # a second stay the card declines: owed too
    clock.advance(timedelta(hours=1))
    card.script("decline")
    assert desk.exit("carol").reason == Reason.INSUFFICIENT_BALANCE
    assert central.get_account("carol").debt_minor == 2000
    desk.enter("carol")
    clock.advance(timedelta(hours=1))

    paid = desk.exit("carol")  # the card pays: both debts are collected with it

    assert paid.reason == Reason.PAID
    assert central.get_account("carol").debt_minor == 0
    assert card.captured_minor() == 1500 + 500 + 500
    audit_ledger(central)


@pytest.mark.parametrize(
    ("refund", "refunds", "wallet"),
    [("error", [], 400), ("timeout_after", [400], 0)],
    ids=["refund-fails-wallet-credited", "refund-answer-lost-found-again"],
)
async def test_a_lost_capture_above_a_fallen_price_keeps_only_the_price(
    central: Central,
    desk: Desk,
    clock: FakeClock,
    refund: CardOutcome,
    refunds: list[int],
    wallet: int,
) -> None:
    """The excess of the first capture goes back to the card, or if the card refund fails,
    to the wallet; the stay is paid, never owed, and the ledger holds what the card took."""
    pay_later(central)
    with central.db() as db:
        parking = db.exec(select(ParkingSession)).one()
        validation = ValidationCreate(kind="amount_off", value=400, reason="R1", merchant="Cafe")
        payments.add_validation(db, parking, validation, now=clock.now())
    sandbox(central).script(refund)

    paid = desk.exit("carol")

    assert (paid.reason, paid.amount) == (Reason.PAID, Money(amount_minor=600, currency="CNY"))
    kept = 1000 - wallet
    assert stay_money(central) == ([("", kept)], refunds)
    assert central.balance("carol") == wallet
    assert central.get_account("carol").debt_minor == 0
    assert sandbox(central).captured_minor() == 1000
    audit_ledger(central)
