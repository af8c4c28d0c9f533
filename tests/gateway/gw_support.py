"""Test support for the gateway tests (imported by conftest and tests).

The harness wires a real :class:`~gateway_firmware.app.Gateway` to an in-memory broker, a
ScriptedCamera with a MarkerDecoder, sim devices, and a tiny fake central service that
answers each ScanEvent with a GateCommand (or an EventAck for offline replays).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from gateway_firmware.app import Gateway
from gateway_firmware.config import GatewaySettings
from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    CommandReply,
    EventAck,
    GateCommand,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, all_gates_filter, gate_topic
from parking_protocol.transport import InMemoryBroker, InMemoryTransport
from parking_protocol.types import DENY_TEXT, GateAction, Reason
from sim_devices.devices import (
    ScriptedCamera,
    SimDisplay,
    SimGate,
    SimPresence,
)

LOT, GATE = "lot1", "in1"


async def eventually(
    predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
) -> None:
    """Wait (real time) until ``predicate()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class FakeServer:
    """Answers ScanEvents on every gate's events topic like the central service would."""

    broker: InMemoryBroker
    clock: FakeClock
    action: GateAction = GateAction.OPEN
    display: str = "Welcome"
    reason: Reason = Reason.WELCOME
    silent: bool = False
    events: list[ScanEvent] = field(default_factory=list)
    replies: list[CommandReply] = field(default_factory=list)
    commands: list[GateCommand] = field(default_factory=list)
    client: InMemoryTransport | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.client = self.broker.client("server")
        await self.client.start()
        await self.client.subscribe(all_gates_filter(TopicKind.EVENTS))
        await self.client.subscribe(all_gates_filter(TopicKind.REPLIES))
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        assert self.client is not None
        async for raw in self.client.messages():
            message = decode(raw.payload)
            if isinstance(message, CommandReply):
                self.replies.append(message)
            elif isinstance(message, ScanEvent):
                self.events.append(message)
                if not self.silent:
                    await self.answer(message)

    async def answer(self, event: ScanEvent) -> None:
        topic = gate_topic(event.lot_id, event.gate_id, TopicKind.COMMANDS)
        assert self.client is not None
        if event.offline is not None:
            ack = EventAck(
                event_id=event.event_id,
                lot_id=event.lot_id,
                gate_id=event.gate_id,
                result=event.offline.reason,
            )
            await self.client.publish(topic, encode(ack))
            return
        command = self.command(event_id=event.event_id)
        self.commands.append(command)
        await self.client.publish(topic, encode(command))

    def command(self, **overrides: Any) -> GateCommand:
        now = self.clock.now()
        values: dict[str, Any] = {
            "command_id": new_id(),
            "event_id": None,
            "lot_id": LOT,
            "gate_id": GATE,
            "action": self.action,
            "reason": self.reason,
            "display": self.display,
            "issued_at": now,
            "deadline": now + timedelta(seconds=10),
        }
        values.update(overrides)
        return GateCommand(**values)

    async def send(self, payload: bytes, topic: str | None = None) -> None:
        assert self.client is not None
        await self.client.publish(topic or gate_topic(LOT, GATE, TopicKind.COMMANDS), payload)

    def deny(self, reason: Reason) -> None:
        self.action, self.reason, self.display = GateAction.DENY, reason, DENY_TEXT[reason]


@dataclass
class Harness:
    gateway: Gateway
    broker: InMemoryBroker
    server: FakeServer
    clock: FakeClock
    camera: ScriptedCamera
    gate: SimGate
    display: SimDisplay
    presence: SimPresence | None
    settings: GatewaySettings
    task: asyncio.Task[None] | None = None

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    async def start(self) -> None:
        self.task = asyncio.create_task(self.gateway.run())
        await asyncio.wait_for(self.gateway.started.wait(), 2)

    async def stop(self) -> None:
        self.gateway.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)
            self.task = None


HarnessFactory = Callable[..., Harness]
