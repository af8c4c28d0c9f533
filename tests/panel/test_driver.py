"""The driver page: sign in with a PIN, a fresh code, balance, top-up and history."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from panel_support import central_of, form_token, page_token, signed_in

from parking_protocol.qr_token import verify_code
from server.audit import service as audit


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
    body = {"amount_minor": 5000}

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
