"""The REST API and the driver page, through the ASGI app with its lifespan (SQLite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import API_TOKEN, AUTH, asgi_client
from fastapi import FastAPI

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    GateCommand,
    GatewayState,
    GatewayStatus,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import load_public_key, verify_code
from parking_protocol.topics import TopicKind, all_gates_filter, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, GateAction, Reason
from server.central import Central
from server.config import ServerSettings
from server.main import create_app

LOT = {
    "lot_id": "lot1",
    "name": "Main street",
    "capacity": 10,
    "tariff": {
        "grace_minutes": 15,
        "hourly_minor": 500,
        "daily_cap_minor": 6000,
        "currency": "CNY",
    },
}


@pytest.fixture
def app(sqlite_url: str, tmp_path: Path, clock: FakeClock, broker: InMemoryBroker) -> FastAPI:
    settings = ServerSettings(
        database_url=sqlite_url,
        key_file=tmp_path / "keys" / "signing.pem",
        bootstrap_api_token=API_TOKEN,
    )
    return create_app(settings, clock=clock, transport=broker.client("central"))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as http:
        yield http


def central_of(app: FastAPI) -> Central:
    central: Central = app.state.central
    return central


async def seed(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/v1/lots", json=LOT)).status_code == 201
    for gate_id, direction in (("in1", "entry"), ("out1", "exit")):
        response = await client.post(
            "/api/v1/lots/lot1/gates", json={"gate_id": gate_id, "direction": direction}
        )
        assert response.status_code == 201, response.text
    response = await client.post("/api/v1/accounts", json={"account_id": "alice", "name": "Alice"})
    assert response.status_code == 201


async def test_health_ready_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"
    assert ready.json()["mqtt"] == "connected"
    schema = (await client.get("/openapi.json")).json()
    assert "/api/v1/accounts/{account_id}/topups" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_keys_verify_the_codes_the_api_issues(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await seed(client)
    [key] = (await client.get("/api/v1/keys")).json()["keys"]

    response = await client.post("/api/v1/accounts/alice/codes")

    assert response.status_code == 201
    body = response.json()
    assert body["kid"] == key["kid"]
    claims = verify_code(
        body["code"],
        {key["kid"]: load_public_key(key["public_key"])},
        now=clock.now(),
    )
    assert claims.account_id == "alice"


async def test_lots_are_created_listed_and_show_occupancy(client: httpx.AsyncClient) -> None:
    created = await client.post("/api/v1/lots", json=LOT)
    assert created.status_code == 201
    assert created.json()["timezone"] == "Asia/Shanghai"
    assert created.json()["occupancy"] == {"open_sessions": 0, "capacity": 10, "full": False}

    assert [lot["lot_id"] for lot in (await client.get("/api/v1/lots")).json()] == ["lot1"]
    assert (await client.get("/api/v1/lots/lot1")).json()["tariff"]["hourly_minor"] == 500
    duplicate = await client.post("/api/v1/lots", json=LOT)
    assert duplicate.status_code == 409
    assert "already exists" in duplicate.json()["detail"]
    assert (await client.get("/api/v1/lots/nope")).status_code == 404


@pytest.mark.parametrize(
    "change",
    [
        {"lot_id": "bad/id"},
        {"capacity": 0},
        {"timezone": "Mars/Olympus"},
        {"tariff": {"hourly_minor": -1}},
        {"tariff": {"currency": "yuan"}},
        {"surprise": True},
    ],
)
async def test_invalid_lots_are_422(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    response = await client.post("/api/v1/lots", json={**LOT, **change})

    assert response.status_code == 422
    assert "detail" in response.json()


async def test_gates_are_created_listed_with_their_status(
    client: httpx.AsyncClient, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await seed(client)
    gateway = broker.client("gw")
    await gateway.start()

    status = GatewayStatus(
        status_id=new_id(),
        lot_id="lot1",
        gate_id="in1",
        state=GatewayState.ONLINE,
        firmware_version="0.3.1",
        boot=4,
        sent_at=clock.now(),
    )
    await gateway.publish(gate_topic("lot1", "in1", TopicKind.STATUS), encode(status), retain=True)
    for _ in range(300):  # the bridge stores it asynchronously
        gates = {g["gate_id"]: g for g in (await client.get("/api/v1/lots/lot1/gates")).json()}
        if gates["in1"]["status"]:
            break
        await asyncio.sleep(0.01)
    assert gates["in1"]["direction"] == "entry"
    assert gates["in1"]["status"]["online"] is True
    assert gates["in1"]["status"]["firmware_version"] == "0.3.1"
    assert gates["out1"]["status"] is None
    duplicate = await client.post(
        "/api/v1/lots/lot1/gates", json={"gate_id": "in1", "direction": "exit"}
    )
    assert duplicate.status_code == 409
    bad = await client.post("/api/v1/lots/lot1/gates", json={"gate_id": "x", "direction": "up"})
    assert bad.status_code == 422
    missing = await client.post(
        "/api/v1/lots/nope/gates", json={"gate_id": "x", "direction": "exit"}
    )
    assert missing.status_code == 404


async def test_accounts_are_created_with_generated_or_given_ids(client: httpx.AsyncClient) -> None:
    generated = await client.post("/api/v1/accounts", json={"name": "Anonymous"})
    assert generated.status_code == 201
    account_id = generated.json()["account_id"]
    fetched = (await client.get(f"/api/v1/accounts/{account_id}")).json()
    assert fetched == {**generated.json()}
    assert (fetched["balance_minor"], fetched["currency"], fetched["blocked"]) == (0, "CNY", False)

    given = await client.post("/api/v1/accounts", json={"account_id": "bob_1", "name": "Bob"})
    assert given.json()["account_id"] == "bob_1"
    again = await client.post("/api/v1/accounts", json={"account_id": "bob_1", "name": "Bob"})
    assert again.status_code == 409
    bad = await client.post("/api/v1/accounts", json={"account_id": "no spaces", "name": "x"})
    assert bad.status_code == 422
    assert (await client.get("/api/v1/accounts/ghost")).status_code == 404


async def test_topup_with_the_same_idempotency_key_credits_once(client: httpx.AsyncClient) -> None:
    await seed(client)
    url = "/api/v1/accounts/alice/topups"
    headers = {"Idempotency-Key": "pay-123"}

    first = await client.post(url, json={"amount_minor": 5000}, headers=headers)
    second = await client.post(url, json={"amount_minor": 5000}, headers=headers)

    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["balance_minor"] == 5000
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 5000

    other = await client.post(url, json={"amount_minor": 7000}, headers=headers)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    fresh = await client.post(
        url, json={"amount_minor": 7000}, headers={"Idempotency-Key": "pay-124"}
    )
    assert fresh.json()["balance_minor"] == 12_000


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"amount_minor": 100}, {}, 422),  # the key is required
        ({"amount_minor": 0}, {"Idempotency-Key": "k"}, 422),
        ({"amount_minor": -5}, {"Idempotency-Key": "k"}, 422),
        ({"amount_minor": 1.5}, {"Idempotency-Key": "k"}, 422),
        ({"amount_minor": "100"}, {"Idempotency-Key": "k"}, 422),
    ],
)
async def test_invalid_topups_are_refused(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], status: int
) -> None:
    await seed(client)

    response = await client.post("/api/v1/accounts/alice/topups", json=body, headers=headers)

    assert response.status_code == status
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 0


async def test_topup_for_unknown_account_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/accounts/ghost/topups", json={"amount_minor": 1}, headers={"Idempotency-Key": "k"}
    )
    assert response.status_code == 404


async def test_code_svg_is_a_fresh_uncached_qr_image(client: httpx.AsyncClient) -> None:
    await seed(client)

    response = await client.get("/api/v1/accounts/alice/code.svg")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-code-lifetime"] == "60"
    assert response.text.lstrip().startswith("<?xml") or "<svg" in response.text[:200]
    assert "<path" in response.text
    assert (await client.get("/api/v1/accounts/ghost/code.svg")).status_code == 404
    assert (await client.post("/api/v1/accounts/ghost/codes")).status_code == 404


async def test_the_old_kiosk_driver_page_sends_the_driver_to_sign_in(
    client: httpx.AsyncClient,
) -> None:
    # It read the API anonymously; the API requires authentication now.
    response = await client.get("/driver/alice")

    assert response.status_code == 303
    assert response.headers["location"] == "/driver/login?account=alice"


async def test_sessions_api_shows_a_paid_stay(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await seed(client)
    await client.post(
        "/api/v1/accounts/alice/topups",
        json={"amount_minor": 5000},
        headers={"Idempotency-Key": "a"},
    )
    gateway = broker.client("gw")
    await gateway.start()
    await gateway.subscribe(all_gates_filter(TopicKind.COMMANDS))
    messages = aiter(gateway.messages())

    async def scan(gate_id: str, direction: Direction) -> GateCommand:
        code = (await client.post("/api/v1/accounts/alice/codes")).json()["code"]
        event = ScanEvent(
            event_id=new_id(),
            lot_id="lot1",
            gate_id=gate_id,
            seq=0,
            boot=1,
            direction=direction,
            code=code,
            scanned_at=clock.now(),
        )
        await gateway.publish(gate_topic("lot1", gate_id, TopicKind.EVENTS), encode(event))
        message = await anext(messages)
        command = decode(message.payload, GateCommand)
        assert command.event_id == event.event_id
        return command

    entry = await scan("in1", Direction.ENTRY)
    open_list = (await client.get("/api/v1/sessions", params={"state": "open"})).json()
    assert [s["session_id"] for s in open_list] == [entry.session_id]
    assert (await client.get("/api/v1/lots/lot1")).json()["occupancy"]["open_sessions"] == 1
    clock.advance(timedelta(hours=1, minutes=30))
    paid = await scan("out1", Direction.EXIT)
    assert (paid.action, paid.reason) == (GateAction.OPEN, Reason.PAID)

    detail = (await client.get(f"/api/v1/sessions/{entry.session_id}")).json()
    assert detail["state"] == "closed"
    assert detail["amount"] == {"amount_minor": 1000, "currency": "CNY"}
    assert detail["duration_s"] == 5400
    assert [i["amount_minor"] for i in detail["line_items"]] == [1000]
    assert (await client.get("/api/v1/accounts/alice")).json()["balance_minor"] == 4000
    closed = await client.get("/api/v1/sessions", params={"account_id": "alice", "state": "closed"})
    assert len(closed.json()) == 1
    assert (await client.get("/api/v1/sessions", params={"lot_id": "other"})).json() == []
    assert (await client.get("/api/v1/sessions/nope")).status_code == 404
    assert (await client.get("/api/v1/sessions", params={"state": "weird"})).status_code == 422
    assert (await client.get("/api/v1/sessions", params={"limit": 0})).status_code == 422


async def test_api_only_mode_runs_without_mqtt(sqlite_url: str, tmp_path: Path) -> None:
    settings = ServerSettings(
        database_url=sqlite_url,
        key_file=tmp_path / "k.pem",
        mqtt_enabled=False,
        bootstrap_api_token=API_TOKEN,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert central_of(app).transport is None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=AUTH
        ) as http:
            assert (await http.get("/ready")).json()["mqtt"] == "disabled"
            assert (await http.post("/api/v1/lots", json=LOT)).status_code == 201
