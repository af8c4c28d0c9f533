"""The MQTT bridge beyond scans: shared subscriptions, command replies, a real Mosquitto."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, func, select

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
from parking_protocol.topics import TopicKind, gate_topic, parse_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, Reason
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import CommandReplyRecord, GateCreate
from server.lots.models import LotCreate
from server.mqtt.bridge import Bridge, Inbound
from server.sessions.flows import handle_scan
from server.sessions.models import DeadLetter, ParkingSession


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


def _inbound(event: ScanEvent) -> Inbound:
    topic = gate_topic(event.lot_id, event.gate_id, TopicKind.EVENTS)
    ref = parse_topic(topic)
    assert ref is not None
    return Inbound(ref=ref, topic=topic, payload=encode(event), message=event)


def _wait_for_lock_waiter(engine: sa.Engine, timeout_s: float = 10.0) -> None:
    """Until some backend of this database waits on a row lock (the loser of the race)."""
    deadline = time.monotonic() + timeout_s
    query = sa.text(
        "select count(*) from pg_stat_activity"
        " where datname = current_database() and wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() > 0:
                return
        time.sleep(0.02)
    raise AssertionError("the second writer never waited on the first one's rows")


@pytest.mark.postgres
@pytest.mark.parametrize("same_event", [True, False], ids=["same-event", "same-code-other-gate"])
async def test_two_writers_racing_on_one_event_or_code_never_contradict(
    pg_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock, same_event: bool
) -> None:
    """Two service processes on one PostgreSQL (shared subscription) can be handed the same
    event, or the same code at two gates, at the same moment. The loser blocks on the
    winner's rows, hits a unique index when the winner commits, and is handled again: the
    same event gets the winner's stored answer (same command id); the same code at another
    gate is denied as replayed. Neither is a dead letter or an INTERNAL_ERROR."""
    broker = InMemoryBroker()
    central = build_central(make_settings(pg_url), clock=clock, transport=broker.client("a"))
    await central.start()
    try:
        seed(central)
        central.create_gate("lot1", GateCreate(gate_id="in2", direction=Direction.ENTRY))
        first = scan_event(central, clock)
        second = (
            first
            if same_event
            else first.model_copy(update={"event_id": new_id(), "gate_id": "in2"})
        )
        decided, release = threading.Event(), threading.Event()

        def holding(*args: Any, **kwargs: Any) -> Any:
            reply = handle_scan(*args, **kwargs)
            decided.set()
            assert release.wait(20), "never released"
            return reply

        winner = Bridge(
            broker.client("w"), central.engine, clock, central.flow_config, handler=holding
        )
        loser = Bridge(broker.client("l"), central.engine, clock, central.flow_config)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            won = pool.submit(winner.process_batch, [_inbound(first)])
            assert await asyncio.to_thread(decided.wait, 20)
            lost = pool.submit(loser.process_batch, [_inbound(second)])
            await asyncio.to_thread(_wait_for_lock_waiter, central.engine)
            release.set()
            [won_reply], [lost_reply] = won.result(30), lost.result(30)

        assert isinstance(won_reply.message, GateCommand)
        assert isinstance(lost_reply.message, GateCommand)
        assert won_reply.message.reason == Reason.WELCOME
        if same_event:
            assert lost_reply.replayed
            assert lost_reply.message.command_id == won_reply.message.command_id
        else:
            assert lost_reply.message.reason == Reason.CODE_REPLAYED
        assert loser.stats.conflicts == 1
        assert loser.stats.dead_letters == 0
        with Session(central.engine) as db:
            assert db.exec(select(func.count()).select_from(DeadLetter)).one() == 0
            assert db.exec(select(func.count()).select_from(ParkingSession)).one() == 1
    finally:
        await central.stop()
