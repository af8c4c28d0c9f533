"""Collecting debts by card and bounding the card provider, on SQLite and PostgreSQL: a debt
the card refuses does not stop the ones after it, and a card network that does not answer
costs a scan at most the bound, not the lane."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from money_support import Desk, audit_ledger, sandbox

from parking_protocol.clock import FakeClock
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.models import Account, AccountCreate
from server.central import Central
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.payments.provider import Authorisation, ChargeContext, SandboxCardProvider

pytestmark = pytest.mark.usefixtures("database_url")

HOURLY = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=None, currency="CNY")


@pytest.fixture
def central(central_without_mqtt: Central) -> Central:
    return central_without_mqtt


def open_lot(central: Central, policy: str) -> None:
    lot = LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=HOURLY, payment_policy=policy)
    central.create_lot(lot)
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="carol", name="Carol"))
    with central.db() as db:
        account = db.get(Account, "carol")
        assert account is not None
        account.payment_method, account.card_token = "card", "tok_ok"


def stay(desk: Desk, clock: FakeClock, hours: int) -> None:
    desk.enter("carol")
    clock.advance(timedelta(hours=hours))


async def test_a_debt_the_card_refuses_does_not_stop_the_next_one_being_collected(
    central: Central, clock: FakeClock
) -> None:
    open_lot(central, "pay_later")
    desk, card = Desk(central, clock), sandbox(central)
    for hours in (1, 2):  # ¥5.00 then ¥10.00, each declined at the exit: owed
        stay(desk, clock, hours)
        card.script("decline")
        assert desk.exit("carol").reason == Reason.INSUFFICIENT_BALANCE
    assert central.get_account("carol").debt_minor == 1500
    stay(desk, clock, 1)
    card.script("ok", "ok", "decline")  # this exit's charge, then the oldest debt refused

    paid = desk.exit("carol")

    assert paid.reason == Reason.PAID
    assert central.get_account("carol").debt_minor == 500  # the ¥10.00 one was collected
    assert card.captured_minor() == 500 + 1000
    audit_ledger(central)


@dataclass
class SlowCard(SandboxCardProvider):
    """The sandbox, but authorisations wait until ``answer`` is set (at most ``hold_s``)."""

    answer: threading.Event = field(default_factory=threading.Event)
    hold_s: float = 5.0

    def authorise(self, ctx: ChargeContext, amount: Money, *, key: str) -> Authorisation:
        self.answer.wait(self.hold_s)
        return super().authorise(ctx, amount, key=key)


@pytest.fixture
def slow_card(central: Central) -> Iterator[SlowCard]:
    card = SlowCard()
    payments = central.flow_config.payments
    payments.card, payments.call_timeout_s = card, 0.2
    try:
        yield card
    finally:
        card.answer.set()


async def test_a_card_network_that_does_not_answer_costs_an_exit_only_the_bound(
    central: Central, clock: FakeClock, slow_card: SlowCard
) -> None:
    open_lot(central, "pay_on_exit")
    desk = Desk(central, clock)
    stay(desk, clock, 2)

    started = time.monotonic()
    denied = desk.exit("carol")
    took = time.monotonic() - started

    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.SERVICE_UNAVAILABLE)
    assert took < 2.0, f"the scan waited {took:.1f}s on the card network"
    slow_card.answer.set()  # the network answers at last: the retry finds its capture
    paid = desk.exit("carol")
    assert (paid.reason, paid.amount) == (Reason.PAID, Money(amount_minor=1000, currency="CNY"))
    assert slow_card.captured_minor() == 1000
    audit_ledger(central)
