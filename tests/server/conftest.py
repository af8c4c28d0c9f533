"""Fixtures for the central service: a Central on SQLite or PostgreSQL, an in-memory broker,
a fake clock, and a ``Lane`` that plays a gateway publishing scans and awaiting answers.

PostgreSQL: one uniquely named database per test session (dropped afterwards) and a fresh
schema per test. Unreachable PostgreSQL skips those tests, or fails them when
``QRPARK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from service_guard import missing_service

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    EventAck,
    GateCommand,
    OfflineDecision,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker, InMemoryTransport
from parking_protocol.types import Direction
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema

PG_ADMIN_URL = os.environ.get(
    "QRPARK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
TARIFF = TariffSchema(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database ``qrpark_test_<random>`` for this session, dropped afterwards."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"qrpark_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        missing_service(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc.orig}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A fresh schema per test, selected through the connection's search_path."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{pg_database}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qrpark.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every flow test runs on both databases."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., ServerSettings]:
    """``make_settings(database_url, **overrides)`` with a per-test key file."""

    def make(database_url: str, **overrides: object) -> ServerSettings:
        values: dict[str, object] = {
            "database_url": database_url,
            "key_file": tmp_path / "keys" / "signing.pem",
            "mqtt_url": "mqtt://127.0.0.1:1",
        }
        values.update(overrides)
        return ServerSettings.model_validate(values)

    return make


@pytest.fixture
def settings(database_url: str, make_settings: Callable[..., ServerSettings]) -> ServerSettings:
    return make_settings(database_url)


@pytest.fixture
async def central(
    settings: ServerSettings, clock: FakeClock, broker: InMemoryBroker
) -> AsyncIterator[Central]:
    service = build_central(settings, clock=clock, transport=broker.client("central"))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def central_without_mqtt(
    database_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> AsyncIterator[Central]:
    """A started service on either database with no MQTT bridge (money tests drive the
    flows directly)."""
    service = build_central(make_settings(database_url, mqtt_enabled=False), clock=clock)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@dataclass
class Lane:
    """A fake gateway at one gate: publishes scans, returns the central service's answer."""

    broker: InMemoryBroker
    lot_id: str
    gate_id: str
    direction: Direction
    clock: FakeClock
    client: InMemoryTransport | None = None
    boot: int = 1
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    received: list[GateCommand | EventAck] = field(default_factory=list)

    async def start(self) -> Lane:
        self.client = self.broker.client(f"gw-{self.lot_id}-{self.gate_id}")
        await self.client.start()
        await self.client.subscribe(gate_topic(self.lot_id, self.gate_id, TopicKind.COMMANDS))
        self._messages = aiter(self.client.messages())
        return self

    def event(
        self,
        code: str,
        *,
        event_id: str | None = None,
        offline: OfflineDecision | None = None,
        scanned_at: datetime | None = None,
        direction: Direction | None = None,
        gate_id: str | None = None,
    ) -> ScanEvent:
        return ScanEvent(
            event_id=event_id or new_id(),
            lot_id=self.lot_id,
            gate_id=gate_id or self.gate_id,
            seq=next(self._seq),
            boot=self.boot,
            direction=direction or self.direction,
            code=code,
            scanned_at=scanned_at or self.clock.now(),
            offline=offline,
        )

    async def publish(self, payload: bytes, *, topic: str | None = None) -> None:
        assert self.client is not None
        await self.client.publish(
            topic or gate_topic(self.lot_id, self.gate_id, TopicKind.EVENTS), payload
        )

    async def next_reply(self, timeout: float = 5.0) -> GateCommand | EventAck:
        message = await asyncio.wait_for(anext(self._messages), timeout)
        reply = decode(message.payload)
        assert isinstance(reply, GateCommand | EventAck)
        self.received.append(reply)
        return reply

    async def send(self, event: ScanEvent) -> GateCommand | EventAck:
        await self.publish(encode(event))
        reply = await self.next_reply()
        assert reply.event_id == event.event_id
        return reply

    async def scan(self, code: str, **kwargs: object) -> GateCommand:
        reply = await self.send(self.event(code, **kwargs))  # type: ignore[arg-type]
        assert isinstance(reply, GateCommand)
        return reply


@dataclass
class World:
    """A lot with one entry and one exit gate and a driver with ¥100.00."""

    central: Central
    clock: FakeClock
    entry: Lane
    exit: Lane
    lot_id: str = "lot1"
    account_id: str = "alice"

    def code(self, account_id: str | None = None) -> str:
        return self.central.issue_code(account_id or self.account_id).code

    def balance(self, account_id: str | None = None) -> int:
        return self.central.balance(account_id or self.account_id)


@pytest.fixture
def make_lane(broker: InMemoryBroker, clock: FakeClock) -> Callable[..., Awaitable[Lane]]:
    """``await make_lane(lot_id, gate_id, direction)``: a started fake gateway."""

    async def make(lot_id: str, gate_id: str, direction: Direction) -> Lane:
        return await Lane(broker, lot_id, gate_id, direction, clock).start()

    return make


@pytest.fixture
async def world(central: Central, broker: InMemoryBroker, clock: FakeClock) -> World:
    central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=2, tariff=TARIFF))
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="alice", name="Alice"))
    central.topup("alice", 10_000, idempotency_key="seed")
    entry = await Lane(broker, "lot1", "in1", Direction.ENTRY, clock).start()
    exit_ = await Lane(broker, "lot1", "out1", Direction.EXIT, clock).start()
    return World(central=central, clock=clock, entry=entry, exit=exit_)
