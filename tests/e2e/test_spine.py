"""The spine, end to end on real components.

A simulated driver's signed code is rendered into camera frames, the real gateway firmware
decodes and verifies it and publishes through a real Mosquitto; the central service (on
SQLite and on PostgreSQL) opens, prices and settles the session and answers; the barrier
opens. Only the camera, barrier, loop detector and clock are simulated.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import public_key_text
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.types import DENY_TEXT, Direction, GateAction, Reason
from qrpark.services import MosquittoProcess
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.payments.models import Payment
from sim_devices.lot import SimLane, SimLaneConfig, start_sim_lane
from sim_devices.traffic import Driver, Phone, pass_lane

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

LOT = "p1"
HOURLY = 500  # ¥5.00 per started hour
START_BALANCE = 10_000  # ¥100.00


@dataclass
class Lot:
    central: Central
    clock: FakeClock
    entry: SimLane
    exit: SimLane

    def driver(self, account_id: str) -> Driver:
        async def source(account: str) -> str:
            return (await asyncio.to_thread(self.central.issue_code, account)).code

        return Driver(account_id, Phone(account_id, source, self.clock))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/qrpark.db"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture
async def lot(mosquitto: MosquittoProcess, database_url: str, tmp_path: Path) -> AsyncIterator[Lot]:
    clock = FakeClock()
    client_id = f"central-{uuid.uuid4().hex[:8]}"
    settings = ServerSettings(
        database_url=database_url,
        mqtt_url=mosquitto.url,
        mqtt_client_id=client_id,
        key_file=tmp_path / "keys" / "signing.pem",
    )
    transport = MqttTransport(parse_broker_url(mosquitto.url), client_id, persistent=False)
    central = build_central(settings, clock=clock, transport=transport)
    await central.start()
    assert await transport.wait_connected(10)
    central.create_lot(
        LotCreate(
            lot_id=LOT,
            name="Plaza",
            capacity=10,
            tariff=TariffSchema(
                grace_minutes=15, hourly_minor=HOURLY, daily_cap_minor=6000, currency="CNY"
            ),
        )
    )
    central.create_gate(LOT, GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate(LOT, GateCreate(gate_id="out1", direction=Direction.EXIT))
    for account in ("alice", "bob"):
        central.create_account(AccountCreate(account_id=account, name=account.title()))
    central.topup("alice", START_BALANCE, idempotency_key="alice-initial")
    central.topup("bob", 200, idempotency_key="bob-initial")  # ¥2.00: not enough for an hour
    keys = {kid: public_key_text(key) for kid, key in central.keys.public_keys().items()}

    def config(gate: str, direction: Direction) -> SimLaneConfig:
        return SimLaneConfig(
            lot_id=LOT,
            gate_id=gate,
            direction=direction,
            broker_url=mosquitto.url,
            public_keys=keys,
            data_dir=tmp_path / "gateways" / uuid.uuid4().hex[:6],
            fps=30,
            seed=1,
        )

    entry = await start_sim_lane(config("in1", Direction.ENTRY), clock)
    exit_ = await start_sim_lane(config("out1", Direction.EXIT), clock)
    for lane in (entry, exit_):
        assert await lane.gateway.uplink.transport.wait_connected(10)
    try:
        yield Lot(central, clock, entry, exit_)
    finally:
        await entry.stop()
        await exit_.stop()
        await central.stop()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_driver_enters_and_two_hours_later_pays_exactly_the_price(lot: Lot) -> None:
    alice = lot.driver("alice")

    entered = await pass_lane(lot.entry.lane, alice)
    assert entered.opened
    assert DENY_TEXT[Reason.WELCOME] in lot.entry.display.texts
    (session,) = lot.central.list_sessions(lot_id=LOT, account_id="alice", state="open")
    assert lot.central.get_lot(LOT).occupancy.open_sessions == 1

    lot.clock.advance(timedelta(hours=2))
    left = await pass_lane(lot.exit.lane, alice)
    assert left.opened
    closed = lot.central.get_session(session.session_id)
    assert closed.state == "closed"
    assert closed.amount is not None
    assert closed.amount.amount_minor == 2 * HOURLY
    assert lot.central.balance("alice") == START_BALANCE - 2 * HOURLY
    assert any("¥10.00" in text for text in lot.exit.display.texts)
    assert lot.central.get_lot(LOT).occupancy.open_sessions == 0
    # Each barrier opened exactly once and never closed on the car.
    assert lot.entry.gate.opens == 1
    assert lot.exit.gate.opens == 1
    lot.entry.gate.assert_never_closed_on_vehicle()
    lot.exit.gate.assert_never_closed_on_vehicle()


async def test_second_entry_while_inside_is_denied(lot: Lot) -> None:
    alice = lot.driver("alice")
    assert (await pass_lane(lot.entry.lane, alice)).opened
    lot.clock.advance(timedelta(minutes=2))  # a new code for the second try
    again = await pass_lane(lot.entry.lane, alice, timeout=3)
    assert not again.opened
    assert DENY_TEXT[Reason.ALREADY_INSIDE] in lot.entry.display.texts
    assert len(lot.central.list_sessions(lot_id=LOT, account_id="alice")) == 1


async def test_insufficient_balance_denies_the_exit_and_charges_nothing(lot: Lot) -> None:
    bob = lot.driver("bob")
    assert (await pass_lane(lot.entry.lane, bob)).opened
    lot.clock.advance(timedelta(hours=3))
    refused = await pass_lane(lot.exit.lane, bob, timeout=3)
    assert not refused.opened
    # The driver reads why, and what to do ("Insufficient balance ... top up in the app").
    assert any(
        text.startswith("Insufficient balance") and "top up" in text
        for text in lot.exit.display.texts
    )
    assert lot.central.balance("bob") == 200
    assert len(lot.central.list_sessions(lot_id=LOT, account_id="bob", state="open")) == 1


Maker = Callable[[Lot], Awaitable[str]]


async def _forged(lot: Lot) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from parking_protocol.qr_token import issue_code

    return issue_code(
        Ed25519PrivateKey.generate(),
        kid=lot.central.keys.active.kid,
        account_id="alice",
        now=lot.clock.now(),
    )


async def _expired(lot: Lot) -> str:
    return lot.central.issue_code("alice", now=lot.clock.now() - timedelta(minutes=5)).code


async def _malformed(lot: Lot) -> str:
    return "https://example.com/definitely-not-a-parking-code"


@pytest.mark.parametrize(
    ("make_code", "reason"),
    [
        (_forged, Reason.CODE_BAD_SIGNATURE),
        (_expired, Reason.CODE_EXPIRED),
        (_malformed, Reason.CODE_MALFORMED),
    ],
)
async def test_bad_codes_are_denied_with_their_reason_and_nothing_changes(
    lot: Lot, make_code: Maker, reason: Reason
) -> None:
    code = await make_code(lot)
    lot.entry.scene.vehicle_arrives("car")
    lot.entry.scene.show_code(code)
    await eventually(lambda: DENY_TEXT[reason] in lot.entry.display.texts)
    await asyncio.sleep(0.3)
    assert not lot.entry.gate.is_open
    lot.entry.scene.vehicle_leaves()
    assert lot.central.list_sessions(lot_id=LOT) == []
    assert lot.central.balance("alice") == START_BALANCE


async def test_replayed_code_is_denied_at_another_gate(lot: Lot) -> None:
    """A screenshot of a code that already opened the entry cannot open the exit."""
    alice = lot.driver("alice")
    used = await alice.phone.current_code()  # a screenshot of the code she will show
    assert (await pass_lane(lot.entry.lane, alice)).opened
    assert await alice.phone.current_code() != used  # her app moved on to a fresh code
    lot.exit.scene.vehicle_arrives("car")
    lot.exit.scene.show_code(used)
    await eventually(lambda: DENY_TEXT[Reason.CODE_REPLAYED] in lot.exit.display.texts)
    assert not lot.exit.gate.is_open
    lot.exit.scene.vehicle_leaves()
    assert lot.central.balance("alice") == START_BALANCE
    assert len(lot.central.list_sessions(lot_id=LOT, state="open")) == 1


@dataclass
class HandGateway:
    """A gateway driven by hand on the real broker: publishes exact events, keeps the answers."""

    transport: MqttTransport
    commands: list[GateCommand]

    async def publish(self, event: ScanEvent) -> None:
        topic = gate_topic(event.lot_id, event.gate_id, TopicKind.EVENTS)
        await self.transport.publish(topic, encode(event))

    async def answers(self, event: ScanEvent, count: int) -> list[GateCommand]:
        """Wait for ``count`` commands answering ``event``."""

        def mine() -> list[GateCommand]:
            return [c for c in self.commands if c.event_id == event.event_id]

        await eventually(lambda: len(mine()) >= count)
        return mine()


@pytest.fixture
async def hand_gateway(mosquitto: MosquittoProcess) -> AsyncIterator[HandGateway]:
    transport = MqttTransport(parse_broker_url(mosquitto.url), f"dup-{uuid.uuid4().hex[:6]}")
    for gate in ("in1", "out1"):
        await transport.subscribe(gate_topic(LOT, gate, TopicKind.COMMANDS))
    await transport.start()
    assert await transport.wait_connected(10)
    gateway = HandGateway(transport, [])

    async def collect() -> None:
        async for message in transport.messages():
            command = decode(message.payload)
            if isinstance(command, GateCommand):
                gateway.commands.append(command)

    reader = asyncio.create_task(collect())
    try:
        yield gateway
    finally:
        reader.cancel()
        await transport.close()


def scan_event(lot: Lot, gate_id: str, direction: Direction, seq: int) -> ScanEvent:
    return ScanEvent(
        event_id=new_id(),
        lot_id=LOT,
        gate_id=gate_id,
        seq=seq,
        boot=1,
        direction=direction,
        code=lot.central.issue_code("alice").code,
        scanned_at=lot.clock.now(),
    )


def payments_of(lot: Lot, account_id: str) -> list[Payment]:
    with lot.central.db() as db:
        return list(db.exec(select(Payment).where(Payment.account_id == account_id)).all())


async def test_redelivered_entry_event_opens_one_session(
    lot: Lot, hand_gateway: HandGateway
) -> None:
    """QoS 1 redelivery of an entry: the same command again and one session."""
    event = scan_event(lot, "in1", Direction.ENTRY, seq=1)
    await hand_gateway.publish(event)
    (first,) = await hand_gateway.answers(event, 1)
    await hand_gateway.publish(event)
    _, second = await hand_gateway.answers(event, 2)
    assert first.action is GateAction.OPEN
    assert second.command_id == first.command_id
    assert len(lot.central.list_sessions(lot_id=LOT, account_id="alice")) == 1
    assert lot.central.stats.replays >= 1
    assert payments_of(lot, "alice") == []


async def test_redelivered_exit_event_charges_once_and_gets_the_same_command(
    lot: Lot, hand_gateway: HandGateway
) -> None:
    """QoS 1 redelivery of an exit: one payment, the balance drops once, one command twice."""
    entry = scan_event(lot, "in1", Direction.ENTRY, seq=1)
    await hand_gateway.publish(entry)
    (opened,) = await hand_gateway.answers(entry, 1)
    assert opened.action is GateAction.OPEN

    lot.clock.advance(timedelta(hours=2))
    exit_event = scan_event(lot, "out1", Direction.EXIT, seq=1)
    await hand_gateway.publish(exit_event)
    (first,) = await hand_gateway.answers(exit_event, 1)
    replays_before = lot.central.stats.replays
    await hand_gateway.publish(exit_event)
    _, second = await hand_gateway.answers(exit_event, 2)

    assert first.action is GateAction.OPEN
    assert first.amount is not None
    assert first.amount.amount_minor == 2 * HOURLY
    assert second.command_id == first.command_id
    assert (second.action, second.amount, second.session_id) == (
        first.action,
        first.amount,
        first.session_id,
    )
    assert lot.central.stats.replays == replays_before + 1
    (payment,) = payments_of(lot, "alice")
    assert (payment.amount_minor, payment.session_id) == (2 * HOURLY, first.session_id)
    assert lot.central.balance("alice") == START_BALANCE - 2 * HOURLY
    (session,) = lot.central.list_sessions(lot_id=LOT, account_id="alice")
    assert session.state == "closed"
