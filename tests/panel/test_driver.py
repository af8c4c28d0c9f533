"""The driver page: sign in with a PIN, a fresh code, balance, top-up and history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from panel_support import ADMIN_PASSWORD, central_of, form_token, page_token, signed_in

from parking_protocol.clock import FakeClock
from parking_protocol.qr_token import verify_code
from server.accounts.models import AccountCreate
from server.audit import service as audit
from server.auth import service as auth
from server.config import ServerSettings
from server.main import create_app


async def driver_sign_in(
    client: httpx.AsyncClient, account_id: str = "alice", pin: str = "2468"
) -> httpx.Response:
    page = await client.get("/driver/login")
    return await client.post(
        "/driver/login",
        data={"account_id": account_id, "pin": pin, "csrf_token": form_token(page.text)},
    )


async def test_driver_signs_in_with_the_demo_pin_and_sees_the_app(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    assert (await client.get("/driver")).headers["location"].startswith("/driver/login")

    response = await driver_sign_in(client)

    assert response.status_code == 303
    home = await client.get("/driver")
    assert home.status_code == 200
    assert "Alice Liddell" in home.text
    assert 'id="qr"' in home.text and 'id="countdown"' in home.text
    assert "http://" not in home.text and "https://" not in home.text
    with central_of(app).db() as db:
        assert [e.actor for e in audit.list_entries(db, action="driver.login")] == ["driver:alice"]


async def test_wrong_pin_or_unknown_account_is_refused_alike(client: httpx.AsyncClient) -> None:
    wrong = await driver_sign_in(client, "alice", "0000")
    ghost = await driver_sign_in(client, "ghost", "2468")

    assert wrong.status_code == ghost.status_code == 401
    assert "Account or PIN not recognised" in wrong.text
    assert "Account or PIN not recognised" in ghost.text


async def test_the_code_is_a_valid_signed_code_for_the_signed_in_driver(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    await driver_sign_in(client)

    response = await client.get("/driver/api/code.svg")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-code-lifetime"] == "60"
    assert "<path" in response.text
    central = central_of(app)
    issued = central.issue_code("alice")
    claims = verify_code(issued.code, central.keys.public_keys(), now=central.clock.now())
    assert claims.account_id == "alice"


async def test_driver_tops_up_once_per_key_with_the_csrf_header(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    await driver_sign_in(client)
    token = page_token((await client.get("/driver")).text)
    body = {"amount_minor": 5000, "card_token": "tok_ok"}

    refused = await client.post(
        "/driver/api/topups", json=body, headers={"Idempotency-Key": "k-000001"}
    )
    first = await client.post(
        "/driver/api/topups",
        json=body,
        headers={"Idempotency-Key": "k-000001", "X-CSRF-Token": token},
    )
    again = await client.post(
        "/driver/api/topups",
        json=body,
        headers={"Idempotency-Key": "k-000001", "X-CSRF-Token": token},
    )
    me = (await client.get("/driver/api/me")).json()

    assert refused.status_code == 403
    assert first.status_code == again.status_code == 201
    assert me["account"]["balance_minor"] == 15_000
    with central_of(app).db() as db:
        assert len(audit.list_entries(db, action="account.topup")) == 1


async def test_an_operator_sets_a_pin_which_replaces_the_demo_pin(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)

    response = await client.post(
        "/panel/accounts/bob/pin", data={"pin": "975310", "csrf_token": token}
    )

    assert response.status_code == 303
    client.cookies.clear()
    assert (await driver_sign_in(client, "bob", "2468")).status_code == 401
    assert (await driver_sign_in(client, "bob", "975310")).status_code == 303
    with central_of(app).db() as db:
        [entry] = audit.list_entries(db, action="account.set_pin")
        assert "975310" not in str(entry.details)


async def test_driver_history_lists_stays(client: httpx.AsyncClient, app: FastAPI) -> None:
    await driver_sign_in(client)

    me = (await client.get("/driver/api/me")).json()

    assert me["account"]["account_id"] == "alice"
    assert me["sessions"] == []


async def test_driver_sign_out_needs_the_token_and_ends_the_session(
    client: httpx.AsyncClient,
) -> None:
    await driver_sign_in(client)
    home = await client.get("/driver")
    token = form_token(home.text)

    assert (await client.post("/driver/logout")).status_code == 403
    assert (await client.post("/driver/logout", data={"csrf_token": token})).status_code == 303
    assert (await client.get("/driver/api/me")).status_code == 401


async def test_the_page_offers_a_card_top_up_labelled_as_the_sandbox(
    client: httpx.AsyncClient,
) -> None:
    await driver_sign_in(client)

    home = (await client.get("/driver")).text

    assert 'id="topup"' in home and 'data-topup="2000"' in home
    assert '<option value="tok_ok">Test card - approved</option>' in home
    assert "sandbox test mode: no real money is taken" in home
    assert 'id="topup-result"' in home  # where the page shows the outcome
    assert "no payment" not in home  # the free development top-up is gone


async def test_a_declined_card_tells_the_driver_why_and_credits_nothing(
    client: httpx.AsyncClient,
) -> None:
    await driver_sign_in(client)
    token = page_token((await client.get("/driver")).text)

    declined = await client.post(
        "/driver/api/topups",
        json={"amount_minor": 2000, "card_token": "tok_decline"},
        headers={"Idempotency-Key": "k-000002", "X-CSRF-Token": token},
    )

    assert declined.status_code == 402
    assert declined.json()["detail"].startswith("Card declined")
    assert "nothing was charged" in declined.json()["detail"]
    assert (await client.get("/driver/api/me")).json()["account"]["balance_minor"] == 10_000


@pytest.fixture
async def production(tmp_path: Path, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    """The app in production (secure cookies: https), alice with a PIN and an empty wallet."""
    settings = ServerSettings(
        environment="production",
        database_url=f"sqlite:///{tmp_path / 'prod.db'}",
        key_file=tmp_path / "keys" / "signing.pem",
        admin_password=ADMIN_PASSWORD,
        mqtt_enabled=False,
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        central = central_of(app)
        central.create_account(AccountCreate(account_id="alice", name="Alice Liddell"))
        with central.db() as db:
            auth.set_driver_pin(db, "alice", "2468", now=clock.now())
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://test") as http:
            yield http


async def test_in_production_the_driver_tops_up_by_card_on_the_page(
    production: httpx.AsyncClient,
) -> None:
    assert (await driver_sign_in(production)).status_code == 303
    home = (await production.get("/driver")).text
    assert 'data-topup="5000"' in home and "Test card - approved" in home

    response = await production.post(
        "/driver/api/topups",
        json={"amount_minor": 5000, "card_token": "tok_ok"},
        headers={"Idempotency-Key": "prod-0001", "X-CSRF-Token": page_token(home)},
    )

    assert response.status_code == 201, response.text
    assert response.json()["method"] == "card"
    me = (await production.get("/driver/api/me")).json()
    assert me["account"]["balance_minor"] == 5000
