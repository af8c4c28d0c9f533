"""The MQTT bridge beyond scans: shared subscriptions, command replies, a real Mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlmodel import Session

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    CommandOutcome,
    CommandReply,
    GateCommand,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, Reason
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import CommandReplyRecord, GateCreate
from server.lots.models import LotCreate


def seed(central: Central) -> None:
    central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=5))
    central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_account(AccountCreate(account_id="alice", name="Alice"))


def scan_event(central: Central, clock: FakeClock) -> ScanEvent:
    return ScanEvent(
        event_id=new_id(),
        lot_id="lot1",
        gate_id="in1",
        seq=0,
        boot=1,
        direction=Direction.ENTRY,
        code=central.issue_code("alice").code,
        scanned_at=clock.now(),
    )


async def test_shared_subscription_group_receives_events_and_statuses_stay_plain(
    sqlite_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> None:
    broker = InMemoryBroker()
    settings = make_settings(sqlite_url, mqtt_shared_group="central")
    central = build_central(settings, clock=clock, transport=broker.client("central"))
    await central.start()
    try:
        assert central.bridge is not None
        assert central.bridge.subscriptions() == [
            "$share/central/qrpark/v1/lots/+/gates/+/events",
            "$share/central/qrpark/v1/lots/+/gates/+/replies",
            "qrpark/v1/lots/+/gates/+/status",
        ]
        seed(central)
        gateway = broker.client("gw")
        await gateway.start()
        await gateway.subscribe(gate_topic("lot1", "in1", TopicKind.COMMANDS))
        event = scan_event(central, clock)
        await gateway.publish(gate_topic("lot1", "in1", TopicKind.EVENTS), encode(event))
        message = await asyncio.wait_for(anext(aiter(gateway.messages())), 5)
        assert decode(message.payload, GateCommand).reason == Reason.WELCOME
    finally:
        await central.stop()


async def test_command_replies_are_stored_once(
    sqlite_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> None:
    broker = InMemoryBroker()
    central = build_central(
        make_settings(sqlite_url), clock=clock, transport=broker.client("central")
    )
    await central.start()
    try:
        gateway = broker.client("gw")
        await gateway.start()
        reply = CommandReply(
            reply_id=new_id(),
            command_id=new_id(),
            lot_id="lot1",
            gate_id="in1",
            outcome=CommandOutcome.DONE,
            at=clock.now(),
        )
        for _ in range(2):
            await gateway.publish(gate_topic("lot1", "in1", TopicKind.REPLIES), encode(reply))
        for _ in range(300):
            await asyncio.sleep(0.01)
            await central.wait_idle()
            if central.stats.replies == 2:
                break
        with Session(central.engine) as db:
            stored = db.get(CommandReplyRecord, reply.reply_id)
            assert stored is not None
            assert (stored.command_id, stored.outcome) == (reply.command_id, "done")
    finally:
        await central.stop()


@pytest.mark.broker
async def test_scan_round_trip_through_a_real_mosquitto(
    mosquitto: Any, sqlite_url: str, make_settings: Callable[..., ServerSettings]
) -> None:
    from parking_protocol.mqtt import MqttTransport, parse_broker_url

    clock = FakeClock()
    central = build_central(make_settings(sqlite_url, mqtt_url=mosquitto.url), clock=clock)
    gateway = MqttTransport(parse_broker_url(mosquitto.url), f"gw-{new_id()[:8]}")
    await central.start()
    try:
        assert central.transport is not None
        assert await central.transport.wait_connected(10)
        seed(central)
        await gateway.start()
        assert await gateway.wait_connected(10)
        await gateway.subscribe(gate_topic("lot1", "in1", TopicKind.COMMANDS))
        await asyncio.sleep(0.2)  # the SUBACK
        event = scan_event(central, clock)
        await gateway.publish(gate_topic("lot1", "in1", TopicKind.EVENTS), encode(event))
        message = await asyncio.wait_for(anext(aiter(gateway.messages())), 10)
        command = decode(message.payload, GateCommand)
        assert (command.event_id, command.reason) == (event.event_id, Reason.WELCOME)
    finally:
        await gateway.close()
        await central.stop()
