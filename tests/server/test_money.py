"""Money through the exit flow and the payment services, on SQLite and PostgreSQL:
tariff versions, wallet and card, pay-on-exit and pay-later, debts, lost tickets, permits,
validations, payment in advance, refunds and the ledger that records all of it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from money_support import Desk, audit_ledger, balances, sandbox
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import Account, AccountCreate
from server.audit.models import AuditEntry
from server.central import Central
from server.errors import ConflictError, UnprocessableError
from server.gateways.models import GateCreate
from server.lots.models import Lot, LotCreate, TariffSchema
from server.payments import service as payments
from server.payments.models import (
    PermitCreate,
    RefundCreate,
    SessionPayRead,
    ValidationCreate,
)
from server.payments.service import PaymentRequired, PaymentUnavailable
from server.pricing import service as pricing
from server.pricing.models import TariffSpec
from server.sessions.models import ParkingSession

pytestmark = pytest.mark.usefixtures("database_url")

SIMPLE = TariffSchema(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")


@pytest.fixture
def central(central_without_mqtt: Central) -> Central:
    return central_without_mqtt


def open_lot(central: Central, lot_id: str = "lot1", **extra: object) -> None:
    central.create_lot(LotCreate(lot_id=lot_id, name="Main", capacity=50, **extra))  # type: ignore[arg-type]
    central.create_gate(lot_id, GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate(lot_id, GateCreate(gate_id="out1", direction=Direction.EXIT))


def driver(central: Central, account_id: str, balance: int = 0) -> None:
    central.create_account(AccountCreate(account_id=account_id, name=account_id.title()))
    if balance:
        central.topup(account_id, balance, idempotency_key=f"{account_id}-seed")


def pay_by_card(central: Central, account_id: str, token: str) -> None:
    with central.db() as db:
        account = db.get(Account, account_id)
        assert account is not None
        account.payment_method, account.card_token = "card", token
        db.add(account)


@pytest.fixture
def desk(central: Central, clock: FakeClock) -> Desk:
    open_lot(central, tariff=SIMPLE)
    driver(central, "alice", 10_000)
    return Desk(central, clock)


def session(central: Central, session_id: str | None) -> ParkingSession:
    with Session(central.engine) as db:
        found = db.get(ParkingSession, session_id)
        assert found is not None
        return found


# -- tariff versions ---------------------------------------------------------------------------


async def test_a_stay_is_priced_by_the_tariff_version_in_force_at_entry(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    dearer = TariffSpec(grace_minutes=0, increment_minor=900, daily_cap_minor=None)
    with central.db() as db:
        pricing.add_version(
            db,
            lot_id="lot1",
            currency="CNY",
            tariff=dearer,
            effective_from=clock.now() + timedelta(hours=1),
            now=clock.now(),
        )
    before = desk.enter("alice")
    clock.advance(timedelta(hours=2))  # version 2 is in force by now ...
    paid = desk.exit("alice")
    assert paid.amount == Money(amount_minor=1000, currency="CNY")  # ... but entry was under v1
    assert session(central, before.session_id).tariff_version == 1

    desk.enter("alice")
    clock.advance(timedelta(hours=2))
    again = desk.exit("alice")
    assert again.amount == Money(amount_minor=1800, currency="CNY")
    assert session(central, again.session_id).tariff_version == 2
    audit_ledger(central)


async def test_a_tariff_version_is_never_retroactive_nor_in_another_currency(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    with central.db() as db, pytest.raises(UnprocessableError, match="past"):
        pricing.add_version(
            db,
            lot_id="lot1",
            currency="CNY",
            tariff=TariffSpec(),
            effective_from=clock.now() - timedelta(seconds=1),
            now=clock.now(),
        )
    with central.db() as db, pytest.raises(UnprocessableError, match="EUR"):
        pricing.add_version(
            db,
            lot_id="lot1",
            currency="CNY",
            tariff=TariffSpec(currency="EUR"),
            effective_from=clock.now(),
            now=clock.now(),
        )


# -- wallet, pay on exit and pay later ----------------------------------------------------------


async def test_pay_on_exit_short_wallet_denies_with_what_is_due_and_posts_nothing(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    driver(central, "bob", 100)
    desk.enter("bob")
    clock.advance(timedelta(hours=3))

    denied = desk.exit("bob")

    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.INSUFFICIENT_BALANCE)
    assert denied.display == "Insufficient balance - top up in the app"
    assert denied.amount == Money(amount_minor=1500, currency="CNY")
    assert central.balance("bob") == 100
    assert central.list_sessions(account_id="bob", state="open")
    audit_ledger(central)


async def test_pay_later_opens_the_gate_and_the_next_top_up_collects_the_debt(
    central: Central, clock: FakeClock
) -> None:
    open_lot(central, tariff=SIMPLE, payment_policy="pay_later")
    driver(central, "bob", 100)
    desk = Desk(central, clock)
    first = desk.enter("bob")
    clock.advance(timedelta(hours=3))

    opened = desk.exit("bob")

    assert (opened.action, opened.reason) == (GateAction.OPEN, Reason.INSUFFICIENT_BALANCE)
    assert opened.display == "Unpaid ¥15.00 - owed, top up in the app"
    assert (central.balance("bob"), central.get_account("bob").debt_minor) == (100, 1500)
    assert session(central, first.session_id).settlement == "owed"
    audit_ledger(central)

    small = central.topup("bob", 1000, idempotency_key="bob-2")  # 1100 < 1500: stays owed
    assert small.collected_minor == 0
    enough = central.topup("bob", 1000, idempotency_key="bob-3")

    assert enough.collected_minor == 1500
    assert (central.balance("bob"), central.get_account("bob").debt_minor) == (600, 0)
    assert session(central, first.session_id).settlement == "paid"
    assert balances(central)[("revenue:lot:lot1", "CNY")] == 1500  # earned once, at exit
    audit_ledger(central)


# -- cards ---------------------------------------------------------------------------------


async def test_card_exit_is_captured_through_the_provider_and_the_clearing_account(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    pay_by_card(central, "alice", "tok_ok")
    desk.enter("alice")
    clock.advance(timedelta(hours=2))

    paid = desk.exit("alice")

    assert (paid.action, paid.reason, paid.amount) == (
        GateAction.OPEN,
        Reason.PAID,
        Money(amount_minor=1000, currency="CNY"),
    )
    assert central.balance("alice") == 10_000  # the wallet was not touched
    assert balances(central)[("clearing:card", "CNY")] == -1000
    assert [op for op, _key, _outcome in sandbox(central).calls] == ["authorise", "capture"]
    assert session(central, paid.session_id).payment_method == "card"
    audit_ledger(central)


@pytest.mark.parametrize(
    ("token", "reason", "display", "calls"),
    [
        ("tok_decline", Reason.INSUFFICIENT_BALANCE, "Card declined: ¥10.00 due", ["authorise"]),
        ("tok_timeout", Reason.SERVICE_UNAVAILABLE, "Payment not confirmed", ["authorise"]),
        ("tok_error", Reason.SERVICE_UNAVAILABLE, "Payment not confirmed", ["authorise"]),
        (
            "tok_capture_fail",
            Reason.SERVICE_UNAVAILABLE,
            "Payment not confirmed",
            ["authorise", "capture", "void"],
        ),
    ],
)
async def test_card_failures_deny_the_exit_and_take_nothing(
    central: Central,
    desk: Desk,
    clock: FakeClock,
    token: str,
    reason: Reason,
    display: str,
    calls: list[str],
) -> None:
    pay_by_card(central, "alice", token)
    desk.enter("alice")
    clock.advance(timedelta(hours=2))

    denied = desk.exit("alice")

    assert (denied.action, denied.reason) == (GateAction.DENY, reason)
    assert denied.display.startswith(display)
    assert [op for op, _key, _outcome in sandbox(central).calls] == calls
    assert ("clearing:card", "CNY") not in balances(central)
    assert central.list_sessions(account_id="alice", state="open")
    audit_ledger(central)


async def test_a_capture_whose_answer_was_lost_is_found_again_not_repeated(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    pay_by_card(central, "alice", "tok_ok")
    desk.enter("alice")
    clock.advance(timedelta(hours=2))
    sandbox(central).script("ok", "timeout_after")  # captured, but the answer is lost

    denied = desk.exit("alice")
    assert denied.reason == Reason.SERVICE_UNAVAILABLE
    paid = desk.exit("alice")  # the driver scans again: same session, same provider key

    assert paid.reason == Reason.PAID
    outcomes = [(op, outcome) for op, _key, outcome in sandbox(central).calls]
    assert outcomes == [
        ("authorise", "ok"),
        ("capture", "timeout_after"),
        ("authorise", "replayed"),
        ("capture", "replayed"),
    ]
    assert sandbox(central).captured_minor() == 1000
    audit_ledger(central)


async def test_a_card_charge_also_collects_earlier_debts(
    central: Central, clock: FakeClock
) -> None:
    open_lot(central, tariff=SIMPLE, payment_policy="pay_later")
    driver(central, "bob")
    desk = Desk(central, clock)
    pay_by_card(central, "bob", "tok_decline")
    desk.enter("bob")
    clock.advance(timedelta(hours=1))
    assert desk.exit("bob").reason == Reason.INSUFFICIENT_BALANCE  # opened, owed
    assert central.get_account("bob").debt_minor == 500

    pay_by_card(central, "bob", "tok_ok")
    desk.enter("bob")
    clock.advance(timedelta(hours=2))
    paid = desk.exit("bob")

    assert paid.reason == Reason.PAID
    assert central.get_account("bob").debt_minor == 0
    assert sandbox(central).captured_minor() == 1000 + 500
    audit_ledger(central)


# -- lost ticket, permits, validations, payment in advance ---------------------------------------


async def test_an_exit_without_entry_pays_the_lost_ticket_fee(
    central: Central, clock: FakeClock
) -> None:
    open_lot(central, tariff=TariffSpec(lost_ticket_minor=8000))
    driver(central, "bob", 10_000)
    desk = Desk(central, clock)

    paid = desk.exit("bob")

    assert (paid.action, paid.amount) == (GateAction.OPEN, Money(amount_minor=8000, currency="CNY"))
    lost = session(central, paid.session_id)
    assert (lost.lost_ticket, lost.state, lost.amount_minor) == (True, "closed", 8000)
    driver(central, "carol", 100)
    assert desk.exit("carol").reason == Reason.INSUFFICIENT_BALANCE
    assert central.list_sessions(account_id="carol") == []  # a refused lost ticket leaves no trace
    audit_ledger(central)


async def test_a_permit_makes_the_stay_free(central: Central, desk: Desk, clock: FakeClock) -> None:
    with central.db() as db:
        payments.create_permit(
            db,
            PermitCreate(
                account_id="alice",
                lot_ids=["lot1", "lot9"],
                valid_from=clock.now() - timedelta(days=1),
                valid_until=clock.now() + timedelta(days=30),
            ),
            now=clock.now(),
        )
    desk.enter("alice")
    clock.advance(timedelta(hours=5))

    paid = desk.exit("alice")

    assert paid.amount == Money(amount_minor=0, currency="CNY")
    assert central.balance("alice") == 10_000
    assert "Permit" in session(central, paid.session_id).quote_json  # type: ignore[operator]


async def test_merchant_validations_apply_before_settlement_with_their_reason(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    entered = desk.enter("alice")
    clock.advance(timedelta(hours=4))  # ¥20.00
    with central.db() as db:
        parking = db.get(ParkingSession, entered.session_id)
        assert parking is not None
        payments.add_validation(
            db,
            parking,
            ValidationCreate(kind="time_off", value=60, reason="Ticket 42", merchant="Cinema"),
            now=clock.now(),
        )
        payments.add_validation(
            db,
            parking,
            ValidationCreate(kind="percent_off", value=50, reason="Loyalty", merchant="Mall"),
            now=clock.now(),
        )

    paid = desk.exit("alice")

    assert paid.amount == Money(amount_minor=750, currency="CNY")  # 3 h = 1500, then -50%
    items = central.get_session(entered.session_id or "").line_items
    assert [i.description for i in items][-2:] == [
        "60 min off: Cinema: Ticket 42",
        "50% off: Mall: Loyalty",
    ]
    with central.db() as db:
        closed = db.get(ParkingSession, entered.session_id)
        assert closed is not None
        with pytest.raises(ConflictError, match="closed"):
            payments.add_validation(
                db,
                closed,
                ValidationCreate(kind="amount_off", value=1, reason="late", merchant="x"),
                now=clock.now(),
            )


async def test_paying_in_advance_then_leaving_within_the_exit_grace_costs_nothing_more(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    entered = desk.enter("alice")
    clock.advance(timedelta(hours=1, minutes=50))

    def pay(key: str) -> SessionPayRead:
        with central.db() as db:
            parking = db.get(ParkingSession, entered.session_id)
            assert parking is not None
            lot, row = db.get(Lot, "lot1"), db.get(Account, "alice")
            assert lot is not None and row is not None
            return payments.pay_open_session(
                db,
                central.flow_config.payments,
                lot=lot,
                parking=parking,
                account=row,
                method=None,
                key=key,
                now=clock.now(),
            )

    assert pay("app-1").amount.amount_minor == 1000
    assert pay("app-1").amount.amount_minor == 1000  # the same key: replayed, paid once
    clock.advance(timedelta(minutes=14))
    paid = desk.exit("alice")

    assert paid.amount == Money(amount_minor=0, currency="CNY")
    assert central.balance("alice") == 9000
    closed = central.get_session(entered.session_id or "")
    assert (closed.settlement, closed.prepaid_minor, closed.payment_method) == (
        "paid",
        1000,
        "wallet",
    )
    audit_ledger(central)


async def test_a_declined_payment_in_advance_is_a_402(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    pay_by_card(central, "alice", "tok_decline")
    entered = desk.enter("alice")
    clock.advance(timedelta(hours=1))
    with central.db() as db:
        parking = db.get(ParkingSession, entered.session_id)
        lot, account = db.get(Lot, "lot1"), db.get(Account, "alice")
        assert parking is not None and lot is not None and account is not None
        with pytest.raises(PaymentRequired, match="declined"):
            payments.pay_open_session(
                db,
                central.flow_config.payments,
                lot=lot,
                parking=parking,
                account=account,
                method=None,
                key="k",
                now=clock.now(),
            )


# -- refunds -------------------------------------------------------------------------------------


def refund(central: Central, session_id: str | None, key: str, amount: int | None = None) -> int:
    with central.db() as db:
        parking = db.get(ParkingSession, session_id)
        assert parking is not None
        done, _replayed = payments.refund_session(
            db,
            central.flow_config.payments,
            parking=parking,
            data=RefundCreate(amount_minor=amount, reason="barrier hit the car", actor="op-ann"),
            key=key,
            now=central.clock.now(),
        )
    return sum(r.amount.amount_minor for r in done)


@pytest.mark.parametrize("token", [None, "tok_ok"])
async def test_partial_then_full_refund_back_to_how_it_was_paid_and_audited(
    central: Central, desk: Desk, clock: FakeClock, token: str | None
) -> None:
    if token:
        pay_by_card(central, "alice", token)
    desk.enter("alice")
    clock.advance(timedelta(hours=3))
    paid = desk.exit("alice")

    assert refund(central, paid.session_id, "r1", 500) == 500
    assert refund(central, paid.session_id, "r2") == 1000  # the rest
    with pytest.raises(ConflictError, match="nothing left"):
        refund(central, paid.session_id, "r3")

    assert central.balance("alice") == 10_000  # wallet refunded in full, or never touched
    ledger = balances(central)
    assert ledger[("refunds:lot:lot1", "CNY")] == -1500
    assert ledger[("revenue:lot:lot1", "CNY")] == 1500
    with Session(central.engine) as db:
        entries = db.exec(select(AuditEntry).where(AuditEntry.action == "payment.refund")).all()
    assert [(e.actor, e.reason, e.details["amount_minor"]) for e in entries] == [
        ("op-ann", "barrier hit the car", 500),
        ("op-ann", "barrier hit the car", 1000),
    ]
    audit_ledger(central)


async def test_refunds_above_what_was_paid_or_failing_at_the_provider_change_nothing(
    central: Central, desk: Desk, clock: FakeClock
) -> None:
    pay_by_card(central, "alice", "tok_refund_fail")
    desk.enter("alice")
    clock.advance(timedelta(hours=1))
    paid = desk.exit("alice")

    with pytest.raises(UnprocessableError, match="at most 500"):
        refund(central, paid.session_id, "r1", 501)
    with pytest.raises(PaymentUnavailable, match="refund"):
        refund(central, paid.session_id, "r2", 100)

    assert ("refunds:lot:lot1", "CNY") not in balances(central)
    audit_ledger(central)


async def test_a_timed_out_capture_that_became_a_debt_is_not_charged_twice(
    central: Central, clock: FakeClock
) -> None:
    open_lot(central, tariff=SIMPLE, payment_policy="pay_later")
    driver(central, "bob")
    desk = Desk(central, clock)
    pay_by_card(central, "bob", "tok_ok")
    desk.enter("bob")
    clock.advance(timedelta(hours=1))
    sandbox(central).script("ok", "timeout_after")  # the card network took it, we never heard

    assert desk.exit("bob").reason == Reason.INSUFFICIENT_BALANCE  # opened as a debt
    desk.enter("bob")
    clock.advance(timedelta(hours=1))
    assert desk.exit("bob").reason == Reason.PAID  # this charge also collects the debt ...

    assert central.get_account("bob").debt_minor == 0
    assert sandbox(central).captured_minor() == 500 + 500  # ... without taking it twice
    audit_ledger(central)
