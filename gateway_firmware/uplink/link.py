"""The gateway's MQTT link: its topics, birth/last-will status, publishing and decoding.

It works over any :class:`~parking_protocol.transport.Transport` (MQTT in production, the
in-memory broker in tests). On every (re)connect it publishes a retained ONLINE status (the
birth message) and sets :attr:`Uplink.reconnected` so the app replays its outbox; the MQTT
last will (:func:`status_will`) publishes OFFLINE for the same boot when the link dies.
Every incoming payload is decoded at this edge; a malformed one is logged, counted and
dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from pydantic import BaseModel

from gateway_firmware.config import GatewaySettings
from parking_protocol.messages import (
    CommandReply,
    DenyList,
    EventAck,
    GateCommand,
    GatewayState,
    GatewayStatus,
    ProtocolError,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import QOS, RETAIN, TopicKind, denylist_topic, gate_topic, parse_topic
from parking_protocol.transport import LastWill, Transport, TransportUnavailable

__all__ = ["Inbound", "Uplink", "status_will"]

log = logging.getLogger(__name__)

Inbound = GateCommand | EventAck | DenyList


def status_will(settings: GatewaySettings, boot: int, *, now: datetime | None = None) -> LastWill:
    """The MQTT last will: a retained OFFLINE status for this gateway and boot.

    Pass it when constructing the transport (``MqttTransport(..., will=status_will(...))``).
    """
    status = GatewayStatus(
        status_id=new_id(),
        lot_id=settings.lot_id,
        gate_id=settings.gate_id,
        state=GatewayState.OFFLINE,
        direction=settings.direction,
        firmware_version=settings.firmware_version,
        boot=boot,
        sent_at=now or datetime.now(UTC),
    )
    topic = gate_topic(settings.lot_id, settings.gate_id, TopicKind.STATUS)
    return LastWill(topic, encode(status), qos=QOS[TopicKind.STATUS], retain=True)


class Uplink:
    """Publishes this gateway's messages and yields the ones addressed to it."""

    def __init__(
        self,
        transport: Transport,
        *,
        lot_id: str,
        gate_id: str,
        birth_status: Callable[[], GatewayStatus],
    ) -> None:
        self.transport = transport
        self.lot_id = lot_id
        self.gate_id = gate_id
        self._birth_status = birth_status
        self.events_topic = gate_topic(lot_id, gate_id, TopicKind.EVENTS)
        self.commands_topic = gate_topic(lot_id, gate_id, TopicKind.COMMANDS)
        self.replies_topic = gate_topic(lot_id, gate_id, TopicKind.REPLIES)
        self.status_topic = gate_topic(lot_id, gate_id, TopicKind.STATUS)
        self.denylist_topic = denylist_topic(lot_id)
        # Set on every (re)connect; the app clears it and replays the outbox.
        self.reconnected = asyncio.Event()
        self.connects = 0
        self.malformed: Counter[str] = Counter()
        self.unexpected = 0

    @property
    def connected(self) -> bool:
        return self.transport.connected

    async def start(self) -> None:
        self.transport.on_connect(self._on_connect)
        await self.transport.subscribe(self.commands_topic, QOS[TopicKind.COMMANDS])
        await self.transport.subscribe(self.denylist_topic, QOS[TopicKind.DENYLIST])
        await self.transport.start()

    async def close(self, final_status: GatewayStatus | None = None) -> None:
        """Say goodbye (a clean disconnect sends no will) and disconnect."""
        if final_status is not None and self.connected:
            await self._publish(self.status_topic, final_status, TopicKind.STATUS)
        await self.transport.close()

    async def _on_connect(self) -> None:
        # Runs inside the transport's connection task: keep it short and never raise.
        self.connects += 1
        try:
            await self._publish(self.status_topic, self._birth_status(), TopicKind.STATUS)
        except Exception:
            log.exception("building or publishing the birth status failed")
        self.reconnected.set()

    # -- outgoing ------------------------------------------------------------------------------
    async def publish_event(self, event: ScanEvent) -> bool:
        return await self._publish(self.events_topic, event, TopicKind.EVENTS)

    async def publish_reply(self, reply: CommandReply) -> bool:
        return await self._publish(self.replies_topic, reply, TopicKind.REPLIES)

    async def publish_status(self, status: GatewayStatus) -> bool:
        return await self._publish(self.status_topic, status, TopicKind.STATUS)

    async def _publish(self, topic: str, message: BaseModel, kind: TopicKind) -> bool:
        """True once the broker has it; False when offline (the caller decides what next)."""
        try:
            await self.transport.publish(topic, encode(message), qos=QOS[kind], retain=RETAIN[kind])
        except TransportUnavailable as exc:
            log.debug("publish on %s failed: %s", topic, exc)
            return False
        return True

    # -- incoming ------------------------------------------------------------------------------
    async def inbound(self) -> AsyncIterator[Inbound]:
        """Decoded messages for this gateway; malformed or stray ones are counted and dropped."""
        async for raw in self.transport.messages():
            message = self.accept(raw.topic, raw.payload)
            if message is not None:
                yield message

    def accept(self, topic: str, payload: bytes) -> Inbound | None:
        """Decode one incoming payload, or count and log why it was dropped."""
        ref = parse_topic(topic)
        if ref is None or ref.lot_id != self.lot_id:
            self.unexpected += 1
            log.warning("dropped message on unexpected topic %s", topic)
            return None
        try:
            message = decode(payload)
        except ProtocolError as exc:
            self.malformed[exc.failure.value] += 1
            log.warning("dropped malformed message on %s: %s", topic, exc)
            return None
        expected: tuple[type[BaseModel], ...]
        if ref.kind is TopicKind.COMMANDS and ref.gate_id == self.gate_id:
            expected = (GateCommand, EventAck)
        elif ref.kind is TopicKind.DENYLIST:
            expected = (DenyList,)
        else:
            expected = ()
        if not isinstance(message, expected):
            self.unexpected += 1
            log.warning("dropped %s on %s", type(message).__name__, topic)
            return None
        if isinstance(message, DenyList) and message.lot_id != self.lot_id:
            self.unexpected += 1
            return None
        if isinstance(message, GateCommand | EventAck) and message.gate_id != self.gate_id:
            self.unexpected += 1
            log.warning("dropped %s for gate %s", type(message).__name__, message.gate_id)
            return None
        assert isinstance(message, GateCommand | EventAck | DenyList)
        return message
