"""A driver tops up by card on the driver page's API, on SQLite and PostgreSQL: the sandbox
card takes the money, the ledger moves it from card clearing to the wallet once per
Idempotency-Key, a refused card books nothing and says why, and a driver refused at the
exit for a short wallet tops up and drives out."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from money_support import Desk, audit_ledger, balances, sandbox
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.types import Direction, GateAction, Reason
from server.accounts.models import Account, AccountCreate, LedgerTransaction, TopupRequest
from server.audit import service as audit
from server.central import Central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.main import create_app
from server.payments.topups import provider_key

pytestmark = pytest.mark.usefixtures("database_url")

SIMPLE = TariffSchema(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
URL = "/driver/api/topups"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PAGE_CSRF = re.compile(r'data-csrf="([^"]+)"')


@pytest.fixture
def app(database_url: str, tmp_path: Path, clock: FakeClock) -> FastAPI:
    settings = ServerSettings(
        database_url=database_url,
        key_file=tmp_path / "keys" / "k.pem",
        mqtt_enabled=False,
        demo_driver_pin="2468",
    )
    return create_app(settings, clock=clock)


@pytest.fixture
def central(app: FastAPI) -> Central:
    service: Central = app.state.central
    return service


@pytest.fixture
async def driver(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The signed-in driver page of ``alice`` (wallet empty), its CSRF header set."""
    async with app.router.lifespan_context(app):
        central: Central = app.state.central
        central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=10, tariff=SIMPLE))
        central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
        central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
        central.create_account(AccountCreate(account_id="alice", name="Alice"))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            login = await http.get("/driver/login")
            found = _CSRF.search(login.text)
            assert found is not None
            signed_in = await http.post(
                "/driver/login",
                data={"account_id": "alice", "pin": "2468", "csrf_token": found.group(1)},
            )
            assert signed_in.status_code == 303
            page = _PAGE_CSRF.search((await http.get("/driver")).text)
            assert page is not None
            http.headers["X-CSRF-Token"] = page.group(1)
            yield http


async def top_up(
    driver: httpx.AsyncClient, key: str, amount_minor: int = 5000, card: str | None = "tok_ok"
) -> httpx.Response:
    body: dict[str, object] = {"amount_minor": amount_minor}
    if card is not None:
        body["card_token"] = card
    return await driver.post(URL, json=body, headers={"Idempotency-Key": key})


def topup_transactions(central: Central) -> list[LedgerTransaction]:
    with Session(central.engine) as db:
        return list(db.exec(select(LedgerTransaction).where(LedgerTransaction.kind == "topup")))


async def test_a_card_topup_credits_the_wallet_from_card_clearing_and_balances_the_ledger(
    driver: httpx.AsyncClient, central: Central
) -> None:
    response = await top_up(driver, "topup-0001")

    assert response.status_code == 201, response.text
    answer = response.json()
    assert (answer["amount_minor"], answer["balance_minor"], answer["method"]) == (
        5000,
        5000,
        "card",
    )
    assert answer["provider_ref"].startswith("cap_")
    ledger = balances(central)
    assert ledger[("wallet:alice", "CNY")] == 5000
    assert ledger[("clearing:card", "CNY")] == -5000
    assert ("external:topup", "CNY") not in ledger  # no money out of thin air
    assert sandbox(central).captured_minor() == 5000
    assert (await driver.get("/driver/api/me")).json()["account"]["balance_minor"] == 5000
    with central.db() as db:
        [entry] = audit.list_entries(db, action="account.topup")
        assert entry.actor == "driver:alice"
        assert entry.details["method"] == "card"
    audit_ledger(central)


@pytest.mark.parametrize(
    ("card", "status", "says", "calls"),
    [
        ("tok_decline", 402, "Card declined (card_declined): nothing was charged", ["authorise"]),
        ("tok_timeout", 503, "not confirmed (authorise_timeout)", ["authorise"]),
        ("tok_error", 503, "failed (authorise_failed): nothing was charged", ["authorise"]),
        ("tok_capture_fail", 503, "failed (capture_failed)", ["authorise", "capture", "void"]),
    ],
)
async def test_a_refused_card_books_nothing_and_says_why(
    driver: httpx.AsyncClient,
    central: Central,
    card: str,
    status: int,
    says: str,
    calls: list[str],
) -> None:
    response = await top_up(driver, "topup-0002", card=card)

    assert response.status_code == status
    assert says in response.json()["detail"]
    assert [operation for operation, _key, _outcome in sandbox(central).calls] == calls
    assert balances(central) == {}
    assert sandbox(central).captured_minor() == 0
    with Session(central.engine) as db:
        assert db.exec(select(TopupRequest)).all() == []
    with central.db() as db:
        assert audit.list_entries(db, action="account.topup") == []
    ok = await top_up(driver, "topup-0003")  # another card, another key: it works
    assert (ok.status_code, ok.json()["balance_minor"]) == (201, 5000)
    audit_ledger(central)


async def test_a_redelivered_topup_after_a_lost_answer_charges_once(
    driver: httpx.AsyncClient, central: Central
) -> None:
    card = sandbox(central)
    card.script("ok", "timeout_after")  # the capture is taken, its answer lost

    lost = await top_up(driver, "topup-0004")
    assert lost.status_code == 503
    assert "a retry is never charged twice" in lost.json()["detail"]
    assert card.captured_minor() == 5000  # the card network took it ...
    assert balances(central) == {}  # ... the ledger has not booked it yet

    retried = await top_up(driver, "topup-0004")
    again = await top_up(driver, "topup-0004")

    assert retried.status_code == again.status_code == 201
    assert again.json() == retried.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert retried.json()["balance_minor"] == 5000
    assert card.captured_minor() == 5000
    key = provider_key("alice", "topup-0004")
    assert ("capture", key, "replayed") in card.calls
    assert len(topup_transactions(central)) == 1
    other = await top_up(driver, "topup-0004", amount_minor=2000)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    other_card = await top_up(driver, "topup-0004", card="tok_decline")
    assert other_card.status_code == 422
    assert card.captured_minor() == 5000
    audit_ledger(central)


async def test_a_key_reused_for_another_amount_after_a_lost_answer_credits_what_was_taken(
    driver: httpx.AsyncClient, central: Central
) -> None:
    card = sandbox(central)
    card.script("ok", "timeout_after")
    assert (await top_up(driver, "topup-0005", amount_minor=5000)).status_code == 503

    changed = await top_up(driver, "topup-0005", amount_minor=2000)

    assert changed.status_code == 422
    assert "¥50.00" in changed.json()["detail"]
    assert central.balance("alice") == 5000  # what the card took, booked once
    assert card.captured_minor() == 5000
    replay = await top_up(driver, "topup-0005", amount_minor=5000)
    assert (replay.status_code, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert len(topup_transactions(central)) == 1
    audit_ledger(central)


async def test_the_first_request_retried_after_another_card_reused_its_key_is_a_replay(
    driver: httpx.AsyncClient, central: Central
) -> None:
    """The key is reused by a request for another amount and another card: the first
    attempt is credited at its amount, and the first request, retried as it was, is told so
    instead of a 422 (the recovered booking does not know the first card)."""
    card = sandbox(central)
    card.script("ok", "timeout_after")
    assert (await top_up(driver, "topup-0006", amount_minor=5000)).status_code == 503

    changed = await top_up(driver, "topup-0006", amount_minor=2000, card="tok_error")
    first_again = await top_up(driver, "topup-0006", amount_minor=5000)

    assert changed.status_code == 422
    assert first_again.status_code == 201, first_again.text
    assert first_again.headers["Idempotent-Replayed"] == "true"
    assert first_again.json()["amount_minor"] == 5000
    assert central.balance("alice") == 5000
    assert card.captured_minor() == 5000
    assert len(topup_transactions(central)) == 1
    audit_ledger(central)


async def test_the_card_on_file_pays_when_no_card_is_given(
    driver: httpx.AsyncClient, central: Central
) -> None:
    assert (await top_up(driver, "topup-0006", card=None)).status_code == 422  # none on file
    with central.db() as db:
        account = db.get(Account, "alice")
        assert account is not None
        account.payment_method, account.card_token = "card", "tok_ok"
        db.add(account)

    response = await top_up(driver, "topup-0007", card=None)

    assert (response.status_code, response.json()["balance_minor"]) == (201, 5000)
    assert sandbox(central).captured_minor() == 5000
    audit_ledger(central)


async def test_a_refused_exit_then_a_card_topup_then_the_exit_opens(
    driver: httpx.AsyncClient, central: Central, clock: FakeClock
) -> None:
    desk = Desk(central, clock)
    desk.enter("alice")
    clock.advance(timedelta(hours=3))

    denied = desk.exit("alice")
    assert (denied.action, denied.reason) == (GateAction.DENY, Reason.INSUFFICIENT_BALANCE)
    assert denied.display == "Insufficient balance - top up in the app"

    topped = await top_up(driver, "topup-0008", amount_minor=2000)
    assert topped.status_code == 201, topped.text

    opened = desk.exit("alice")
    assert (opened.action, opened.reason) == (GateAction.OPEN, Reason.PAID)
    assert opened.amount is not None and opened.amount.amount_minor == 1500
    assert central.balance("alice") == 500
    assert balances(central)[("revenue:lot:lot1", "CNY")] == 1500
    assert balances(central)[("clearing:card", "CNY")] == -2000
    audit_ledger(central)


async def test_a_card_topup_collects_what_a_pay_later_stay_owes(
    driver: httpx.AsyncClient, central: Central, clock: FakeClock
) -> None:
    central.create_lot(
        LotCreate(
            lot_id="later",
            name="Later",
            capacity=5,
            tariff=SIMPLE,
            payment_policy="pay_later",
        )
    )
    central.create_gate("later", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("later", GateCreate(gate_id="out1", direction=Direction.EXIT))
    desk = Desk(central, clock, lot_id="later")
    desk.enter("alice")
    clock.advance(timedelta(hours=3))
    assert desk.exit("alice").reason == Reason.INSUFFICIENT_BALANCE  # opened, owed
    assert central.get_account("alice").debt_minor == 1500

    topped = await top_up(driver, "topup-0009", amount_minor=2000)

    assert topped.json()["collected_minor"] == 1500
    assert (central.balance("alice"), central.get_account("alice").debt_minor) == (500, 0)
    audit_ledger(central)
