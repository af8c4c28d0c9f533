"""The money API through the ASGI app: tariff versions and previews, payment methods,
validations, paying in advance, refunds with idempotency keys, permits and receipts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import API_TOKEN, asgi_client
from fastapi import FastAPI
from money_support import Desk, audit_ledger, sandbox

from parking_protocol.clock import FakeClock
from parking_protocol.types import GateAction, Reason
from server.central import Central
from server.config import ServerSettings
from server.main import create_app

SHORTHAND = {"grace_minutes": 15, "hourly_minor": 500, "daily_cap_minor": 6000, "currency": "CNY"}
LOT = {"lot_id": "lot1", "name": "Main", "capacity": 10, "tariff": SHORTHAND}


@pytest.fixture
def app(sqlite_url: str, tmp_path: Path, clock: FakeClock) -> FastAPI:
    settings = ServerSettings(
        database_url=sqlite_url,
        key_file=tmp_path / "keys" / "k.pem",
        mqtt_enabled=False,
        bootstrap_api_token=API_TOKEN,
    )
    return create_app(settings, clock=clock)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as http:
        yield http


@pytest.fixture
async def desk(client: httpx.AsyncClient, app: FastAPI, clock: FakeClock) -> Desk:
    assert (await client.post("/api/v1/lots", json=LOT)).status_code == 201
    for gate_id, direction in (("in1", "entry"), ("out1", "exit")):
        await client.post(
            "/api/v1/lots/lot1/gates", json={"gate_id": gate_id, "direction": direction}
        )
    await client.post("/api/v1/accounts", json={"account_id": "alice", "name": "Alice"})
    await client.post(
        "/api/v1/accounts/alice/topups",
        json={"amount_minor": 10_000},
        headers={"Idempotency-Key": "s"},
    )
    central: Central = app.state.central
    return Desk(central, clock)


async def test_the_shorthand_tariff_becomes_version_1_and_the_lot_shows_its_summary(
    client: httpx.AsyncClient, desk: Desk
) -> None:
    lot = (await client.get("/api/v1/lots/lot1")).json()
    assert lot["tariff"] == SHORTHAND
    assert (lot["tariff_version"], lot["payment_policy"]) == (1, "pay_on_exit")
    [version] = (await client.get("/api/v1/lots/lot1/tariffs")).json()
    assert version["version"] == 1
    assert version["tariff"]["increment_minor"] == 500
    assert version["tariff"]["increment_minutes"] == 60


async def test_a_lot_can_be_created_with_a_full_tariff_and_pay_later(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "lot_id": "mall",
        "name": "Mall",
        "capacity": 5,
        "timezone": "Europe/Berlin",
        "payment_policy": "pay_later",
        "tariff": {
            "currency": "EUR",
            "grace_minutes": 10,
            "increment_minutes": 30,
            "increment_minor": 150,
            "bands": [{"name": "Night", "start": "22:00", "end": "06:00", "increment_minor": 50}],
            "cap_period": "calendar_day",
        },
    }
    created = await client.post("/api/v1/lots", json=body)

    assert created.status_code == 201, created.text
    assert created.json()["tariff"]["hourly_minor"] == 300  # the summary: per hour
    assert created.json()["payment_policy"] == "pay_later"
    bad = {**body, "lot_id": "bad", "tariff": {**body["tariff"], "increment_minutes": 20}}  # type: ignore[dict-item]
    assert (await client.post("/api/v1/lots", json=bad)).status_code == 422


async def test_operators_add_and_preview_a_version_before_it_takes_effect(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    tomorrow = (clock.now() + timedelta(days=1)).isoformat()
    draft = {
        "grace_minutes": 0,
        "increment_minutes": 30,
        "increment_minor": 400,
        "daily_cap_minor": None,
    }
    stay = {"entry_at": tomorrow, "exit_at": (clock.now() + timedelta(days=1, hours=2)).isoformat()}

    preview = await client.post("/api/v1/lots/lot1/quotes", json={**stay, "tariff": draft})
    assert preview.status_code == 200, preview.text
    assert (preview.json()["amount"], preview.json()["version"]) == (
        {"amount_minor": 1600, "currency": "CNY"},
        None,
    )
    in_force = await client.post("/api/v1/lots/lot1/quotes", json=stay)
    assert (in_force.json()["amount"]["amount_minor"], in_force.json()["version"]) == (1000, 1)

    created = await client.post(
        "/api/v1/lots/lot1/tariffs",
        json={"effective_from": tomorrow, "tariff": draft, "note": "2027"},
    )
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 2
    after = await client.post("/api/v1/lots/lot1/quotes", json=stay)
    assert (after.json()["amount"]["amount_minor"], after.json()["version"]) == (1600, 2)
    assert (await client.get("/api/v1/lots/lot1")).json()["tariff_version"] == 1  # not yet
    assert [v["version"] for v in (await client.get("/api/v1/lots/lot1/tariffs")).json()] == [1, 2]
    assert (await client.get("/api/v1/lots/lot1/tariffs/2")).json()["note"] == "2027"

    past = (clock.now() - timedelta(hours=1)).isoformat()
    refused = await client.post(
        "/api/v1/lots/lot1/tariffs", json={"effective_from": past, "tariff": draft}
    )
    assert refused.status_code == 422
    assert "retroactive" in refused.json()["detail"]
    euro = await client.post("/api/v1/lots/lot1/tariffs", json={"tariff": {"currency": "EUR"}})
    assert euro.status_code == 422
    assert (await client.get("/api/v1/lots/lot1/tariffs/9")).status_code == 404
    assert (await client.get("/api/v1/lots/nope/tariffs")).status_code == 404


async def test_validations_and_pay_in_advance_are_idempotent_per_key(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    entered = desk.enter("alice")
    sid = entered.session_id
    clock.advance(timedelta(hours=3))
    validation = {"kind": "amount_off", "value": 300, "reason": "Receipt 7", "merchant": "Cafe"}
    url = f"/api/v1/sessions/{sid}/validations"

    first = await client.post(url, json=validation, headers={"Idempotency-Key": "v1"})
    again = await client.post(url, json=validation, headers={"Idempotency-Key": "v1"})
    other = await client.post(
        url, json={**validation, "value": 900}, headers={"Idempotency-Key": "v1"}
    )

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    quote = (await client.get(f"/api/v1/sessions/{sid}/quote")).json()
    assert quote["due"]["amount_minor"] == 1500 - 300

    pay = f"/api/v1/sessions/{sid}/payments"
    paid = await client.post(pay, json={}, headers={"Idempotency-Key": "p1"})
    repeat = await client.post(pay, json={}, headers={"Idempotency-Key": "p1"})
    assert paid.status_code == repeat.status_code == 201, paid.text
    assert repeat.json() == paid.json()
    assert paid.json()["amount"] == {"amount_minor": 1200, "currency": "CNY"}
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 8800
    assert (
        await client.post(pay, json={"method": "card"}, headers={"Idempotency-Key": "p1"})
    ).status_code == 422

    clock.advance(timedelta(minutes=10))
    out = desk.exit("alice")
    assert (out.action, out.amount.amount_minor if out.amount else None) == (GateAction.OPEN, 0)
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 8800
    audit_ledger(desk.central)


async def test_card_declines_in_advance_are_402_and_the_exit_denies(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    method = await client.put(
        "/api/v1/accounts/alice/payment-method",
        json={"method": "card", "card_token": "tok_decline"},
    )
    assert method.json() == {
        "account_id": "alice",
        "method": "card",
        "card_label": "Card ending line",
    }
    assert (
        await client.put("/api/v1/accounts/alice/payment-method", json={"method": "card"})
    ).status_code == 422
    entered = desk.enter("alice")
    clock.advance(timedelta(hours=1))

    declined = await client.post(
        f"/api/v1/sessions/{entered.session_id}/payments", json={}, headers={"Idempotency-Key": "x"}
    )

    assert declined.status_code == 402
    assert "top up" in declined.json()["detail"]
    assert desk.exit("alice").reason == Reason.INSUFFICIENT_BALANCE
    wallet = await client.post(
        f"/api/v1/sessions/{entered.session_id}/payments",
        json={"method": "wallet"},
        headers={"Idempotency-Key": "y"},
    )
    assert wallet.status_code == 201
    assert desk.exit("alice").reason == Reason.PAID


async def test_refunds_need_a_reason_replay_per_key_and_show_on_the_receipt(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    desk.enter("alice")
    clock.advance(timedelta(hours=2))
    paid = desk.exit("alice")
    url = f"/api/v1/sessions/{paid.session_id}/refunds"
    body = {"amount_minor": 400, "reason": "Gate fault", "actor": "op-li"}

    assert (
        await client.post(url, json={"amount_minor": 1}, headers={"Idempotency-Key": "a"})
    ).status_code == 422
    first = await client.post(url, json=body, headers={"Idempotency-Key": "r1"})
    again = await client.post(url, json=body, headers={"Idempotency-Key": "r1"})
    changed = await client.post(
        url, json={**body, "amount_minor": 500}, headers={"Idempotency-Key": "r1"}
    )
    too_much = await client.post(
        url, json={**body, "amount_minor": 601}, headers={"Idempotency-Key": "r2"}
    )

    assert first.status_code == again.status_code == 201, first.text
    assert again.json() == first.json()
    assert [r["amount"]["amount_minor"] for r in first.json()] == [400]
    assert changed.status_code == 422
    assert too_much.status_code == 422
    assert (await client.get("/api/v1/accounts/alice")).json()[
        "balance_minor"
    ] == 10_000 - 1000 + 400

    receipt = (await client.get(f"/api/v1/sessions/{paid.session_id}/receipt")).json()
    assert receipt["amount"] == {"amount_minor": 1000, "currency": "CNY"}
    assert receipt["tariff_version"] == 1
    assert [p["method"] for p in receipt["payments"]] == ["wallet"]
    assert receipt["refunded"]["amount_minor"] == 400
    assert sum(i["amount_minor"] for i in receipt["line_items"]) == 1000
    page = await client.get(f"/receipts/{paid.session_id}")
    assert page.status_code == 200
    assert "¥10.00" in page.text and "Gate fault" in page.text and "wallet" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    audit_ledger(desk.central)


async def test_open_stays_have_no_receipt_and_unknown_sessions_are_404(
    client: httpx.AsyncClient, desk: Desk
) -> None:
    entered = desk.enter("alice")

    assert (await client.get(f"/api/v1/sessions/{entered.session_id}/receipt")).status_code == 409
    assert (await client.get("/api/v1/sessions/nope/receipt")).status_code == 404
    assert (await client.get("/receipts/nope")).status_code == 404
    refund = await client.post(
        f"/api/v1/sessions/{entered.session_id}/refunds",
        json={"reason": "test refund"},
        headers={"Idempotency-Key": "z"},
    )
    assert refund.status_code == 409


async def test_permits_are_created_listed_and_make_stays_free(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    permit: dict[str, Any] = {
        "account_id": "alice",
        "lot_ids": ["lot1"],
        "valid_from": clock.now().isoformat(),
        "valid_until": (clock.now() + timedelta(days=30)).isoformat(),
        "note": "Season pass",
    }
    created = await client.post("/api/v1/permits", json=permit)
    assert created.status_code == 201, created.text
    assert [p["note"] for p in (await client.get("/api/v1/accounts/alice/permits")).json()] == [
        "Season pass"
    ]
    backwards = {**permit, "valid_until": permit["valid_from"]}
    assert (await client.post("/api/v1/permits", json=backwards)).status_code == 422
    assert (
        await client.post("/api/v1/permits", json={**permit, "account_id": "ghost"})
    ).status_code == 404

    desk.enter("alice")
    clock.advance(timedelta(hours=6))
    assert desk.exit("alice").amount.amount_minor == 0  # type: ignore[union-attr]


async def test_a_payment_in_advance_refused_after_a_capture_keeps_what_the_card_took(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    """A lost capture of ¥10.00, retried at ¥15.00 with the same key: the card declines the
    extra ¥5.00. The ¥10.00 is booked toward the stay (the 402 says so), the retry pays
    only the rest, and the exit owes nothing more."""
    await client.put(
        "/api/v1/accounts/alice/payment-method", json={"method": "card", "card_token": "tok_ok"}
    )
    entered = desk.enter("alice")
    pay = f"/api/v1/sessions/{entered.session_id}/payments"
    clock.advance(timedelta(hours=2))
    card = sandbox(desk.central)
    card.script("ok", "timeout_after")
    assert (await client.post(pay, json={}, headers={"Idempotency-Key": "p1"})).status_code == 503
    clock.advance(timedelta(hours=1))
    card.script("decline")

    refused = await client.post(pay, json={}, headers={"Idempotency-Key": "p1"})

    assert refused.status_code == 402, refused.text
    assert "¥10.00 was taken and counts toward this stay, ¥5.00 is left" in refused.json()["detail"]
    quote = (await client.get(f"/api/v1/sessions/{entered.session_id}/quote")).json()
    assert quote["due"]["amount_minor"] == 500
    paid = await client.post(pay, json={}, headers={"Idempotency-Key": "p1"})
    assert paid.status_code == 201, paid.text
    assert paid.json()["amount"] == {"amount_minor": 500, "currency": "CNY"}
    out = desk.exit("alice")
    assert (out.action, out.amount.amount_minor if out.amount else None) == (GateAction.OPEN, 0)
    assert card.captured_minor() == 1500
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 10_000
    audit_ledger(desk.central)
