"""Validations that would make a stay impossible to price: the API refuses minutes off
beyond 366 days, and a stay carrying such values from before still prices and exits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from api_support import API_TOKEN, asgi_client
from fastapi import FastAPI
from money_support import Desk
from sqlmodel import func, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import new_id
from parking_protocol.types import GateAction
from server.central import Central
from server.config import ServerSettings
from server.main import create_app
from server.payments.models import MAX_TIME_OFF_MINUTES, Validation
from server.sessions.models import DeadLetter

LOT = {
    "lot_id": "lot1",
    "name": "Main",
    "capacity": 10,
    "tariff": {"grace_minutes": 15, "hourly_minor": 500, "daily_cap_minor": 6000},
}


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
    central: Central = app.state.central
    return Desk(central, clock)


async def test_time_off_beyond_366_days_is_a_422(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    sid = desk.enter("alice").session_id
    url = f"/api/v1/sessions/{sid}/validations"

    def body(minutes: int) -> dict[str, object]:
        return {"kind": "time_off", "value": minutes, "reason": "Film", "merchant": "Cinema"}

    too_much = await client.post(
        url, json=body(MAX_TIME_OFF_MINUTES + 1), headers={"Idempotency-Key": "v1"}
    )
    a_year = await client.post(
        url, json=body(MAX_TIME_OFF_MINUTES), headers={"Idempotency-Key": "v2"}
    )

    assert too_much.status_code == 422
    assert "time_off" in too_much.text
    assert a_year.status_code == 201, a_year.text


async def test_a_stay_with_huge_time_off_stored_earlier_still_prices_and_exits(
    client: httpx.AsyncClient, desk: Desk, clock: FakeClock
) -> None:
    sid = desk.enter("alice").session_id
    assert sid is not None
    clock.advance(timedelta(hours=3))
    with desk.central.db() as db:  # as the API accepted them before the cap
        for _ in range(2):
            db.add(
                Validation(
                    validation_id=new_id(),
                    session_id=sid,
                    kind="time_off",
                    value=10**9,
                    reason="legacy",
                    merchant="Cinema",
                    created_at=clock.now(),
                )
            )

    quote = await client.get(f"/api/v1/sessions/{sid}/quote")
    assert quote.status_code == 200, quote.text
    assert quote.json()["due"]["amount_minor"] == 0
    gate = desk.exit("alice")  # the flow prices the stay the same way

    assert gate.action == GateAction.OPEN
    with desk.central.db() as db:
        assert db.exec(select(func.count()).select_from(DeadLetter)).one() == 0
