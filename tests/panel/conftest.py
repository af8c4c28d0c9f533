"""Fixtures for the operator panel and the driver page: the whole app over ASGI (SQLite),
an in-memory broker, a fake clock, a first admin and a lot with two gates and a driver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from panel_support import ADMIN_PASSWORD, START, TARIFF

from parking_protocol.clock import FakeClock
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.accounts.models import AccountCreate
from server.central import Central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.main import create_app


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(
        database_url=f"sqlite:///{tmp_path / 'qrpark.db'}",
        key_file=tmp_path / "keys" / "signing.pem",
        admin_password=ADMIN_PASSWORD,
        demo_driver_pin="2468",
    )


@pytest.fixture
def app(settings: ServerSettings, clock: FakeClock, broker: InMemoryBroker) -> FastAPI:
    return create_app(settings, clock=clock, transport=broker.client("central"))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        central: Central = app.state.central
        central.create_lot(LotCreate(lot_id="lot1", name="Main street", capacity=2, tariff=TARIFF))
        central.create_lot(LotCreate(lot_id="lot2", name="Station", capacity=5, tariff=TARIFF))
        central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
        central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
        central.create_account(AccountCreate(account_id="alice", name="Alice Liddell"))
        central.create_account(AccountCreate(account_id="bob", name="Bob"))
        central.topup("alice", 10_000, idempotency_key="seed")
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http
