"""The real :class:`~parking_protocol.transport.Transport`: MQTT 5 over asyncio.

Packets are encoded and decoded by ``mqtt5`` (a sans-I/O MQTT 5 codec in Rust, by the
author of aiomqtt); this module is the I/O around it: one :class:`asyncio.Protocol` per
connection, so a received packet costs one codec call and no extra socket reads. Needs the
``mqtt5`` package (in both the ``gateway`` and ``server`` extras), imported only when this
module is.

It keeps one connection alive with capped, jittered exponential backoff, re-subscribes on
every connect, sets TCP_NODELAY on the socket (without it Nagle's algorithm meets delayed
ACKs and a round trip costs 40-90 ms instead of <1 ms), and registers a last will.

* QoS 1 messages received are acknowledged at once, all acknowledgements of one read in one
  write; packets written in one turn of the event loop go out in one write.
* A QoS 1 publish waits for its PUBACK (bounded by ``timeout``); at most the broker's
  Receive Maximum are in flight, the rest wait their turn (Mosquitto allows 20).
* A connection attempt fails as soon as the socket closes before CONNACK (a TCP front or
  load balancer with no healthy broker behind it accepts and closes; so does Mosquitto at
  ``max_connections``) and otherwise within ``connect_timeout``. Waiting out a fixed timeout
  instead would line the whole fleet's retries up again after an outage: everyone's attempt
  would end at the same moment, whatever jitter came before.
* A malformed packet from the broker, a missing PINGRESP or a DISCONNECT ends the
  connection; the loop reconnects. Publishes waiting for their PUBACK then fail with
  :class:`~parking_protocol.transport.TransportUnavailable` (the callers send again).

With the logger ``parking_protocol.mqtt.packets`` at DEBUG, every PUBLISH received is
logged (``Received PUBLISH (q1, m7) 'topic'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import mqtt5

from parking_protocol.transport import ConnectHook, InboundMessage, LastWill, TransportUnavailable

__all__ = ["BrokerAddress", "MqttError", "MqttTransport", "parse_broker_url"]

log = logging.getLogger(__name__)
packets_log = logging.getLogger(f"{__name__}.packets")

TCP_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host:1883`` or ``mqtts://host:8883`` (a bare ``host:port`` is mqtt)."""
    scheme, _, rest = url.partition("://")
    if not rest:
        scheme, rest = "mqtt", url
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported broker URL scheme {scheme!r} (use mqtt:// or mqtts://)")
    tls = scheme in ("mqtts", "ssl")
    host, sep, port_text = rest.rstrip("/").rpartition(":")
    if not sep:
        host, port_text = rest.rstrip("/"), "8883" if tls else "1883"
    if not host:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has a bad port") from None
    if not 0 < port < 65536:
        raise ValueError(f"broker URL {url!r} has a bad port")
    return BrokerAddress(host=host, port=port, tls=tls)


class MqttError(Exception):
    """A connection attempt failed or an established connection ended."""


_QOS = (mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE)
_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()
_MAX_REMAINING_LENGTH_BYTES = 4


@dataclass(slots=True)
class _Outgoing:
    """A QoS 1 publish: what to send, and who waits for its PUBACK."""

    topic: str
    payload: bytes
    retain: bool
    expiry: int | None
    future: asyncio.Future[object]
    handle: asyncio.TimerHandle


def _ack(first_byte: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with reason Success and no properties: the four
    bytes MQTT 5 allows for it (3.4.2.1)."""
    return bytes((first_byte, 2, packet_id >> 8, packet_id & 0xFF))


class _Link(asyncio.Protocol):
    """One connection to the broker: framing, acknowledgements, flow control, keepalive."""

    def __init__(self, owner: MqttTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.closed: asyncio.Future[str | None] = loop.create_future()
        """Resolves with why the connection ended (None: the broker closed it)."""
        self._failure: str | None = None
        self._rest = b""  # the start of a packet whose end has not arrived yet
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # packet id -> (the PUBACK/SUBACK waiter, its timeout); kept after a timeout until
        # the ack comes, so the id is not reused while the broker still has the message.
        self._acks: dict[int, tuple[asyncio.Future[object], asyncio.TimerHandle | None]] = {}
        self._in_flight: set[int] = set()  # our QoS 1 publishes awaiting PUBACK
        self._next_id = 0
        self._credit = 65_535  # the broker's Receive Maximum, from CONNACK
        self._backlog: deque[_Outgoing] = deque()  # QoS 1 publishes waiting for credit
        self._incoming_qos2: set[int] = set()
        self._keepalive = 0.0
        self._last_sent = self._last_received = loop.time()
        self._ping_sent: float | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own or uvloop's (which does not subclass asyncio.Transport).
        self.transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(*TCP_NODELAY)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        if self._rest:
            data = self._rest + data
            self._rest = b""
        view = memoryview(data)
        size = len(data)
        offset = 0
        acks: list[bytes] = []
        try:
            while size - offset >= 2 and not self._paused:
                # The fixed header: the type byte, then the remaining length (1-4 bytes).
                length = shift = 0
                i = offset + 1
                complete = False
                while i < size:
                    byte = data[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift >= 7 * _MAX_REMAINING_LENGTH_BYTES:
                        self._protocol_error("malformed packet from the broker: bad length")
                        return
                end = i + length
                if not complete or end > size:
                    break  # the rest of the packet is still on its way
                try:
                    packet, _ = mqtt5.read(view[offset:end])
                except Exception as exc:  # whatever the codec rejects
                    self._protocol_error(f"malformed packet from the broker: {exc}")
                    return
                offset = end
                self._dispatch(packet, acks)
        finally:
            view.release()
        if offset < size:
            self._rest = data[offset:]
        if acks:
            self._send(b"".join(acks) if len(acks) > 1 else acks[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._ticker is not None:
            self._ticker.cancel()
        error = TransportUnavailable(f"MQTT connection lost ({exc or 'closed'})")
        if not self.connack.done():
            self.connack.set_exception(
                MqttError(f"connection closed before CONNACK ({exc or 'closed by the peer'})")
            )
            self.connack.exception()  # retrieved: the attempt may have ended already
        for future, handle in self._acks.values():
            if handle is not None:
                handle.cancel()
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._acks.clear()
        self._in_flight.clear()
        while self._backlog:
            waiting = self._backlog.popleft()
            waiting.handle.cancel()
            if not waiting.future.done():
                waiting.future.set_exception(error)
                waiting.future.exception()
        if not self.closed.done():
            self.closed.set_result(self._failure or (str(exc) if exc is not None else None))

    def pause_writing(self) -> None:  # the broker reads slower than we write: fine, buffered
        pass

    def resume_writing(self) -> None:
        pass

    # -- inbound packets ------------------------------------------------------------------------
    def _dispatch(self, packet: mqtt5.Packet, acks: list[bytes]) -> None:
        if self._ping_sent is not None:
            self._ping_sent = None  # any packet shows the broker is there
        if isinstance(packet, mqtt5.PublishPacket):
            qos = packet.qos
            if qos == 1:
                assert packet.packet_id is not None
                acks.append(_ack(0x40, packet.packet_id))
            elif qos == 2:
                assert packet.packet_id is not None
                acks.append(_ack(0x50, packet.packet_id))
                if packet.packet_id in self._incoming_qos2:
                    return  # the same message again before its PUBREL: delivered once
                self._incoming_qos2.add(packet.packet_id)
            if packets_log.isEnabledFor(logging.DEBUG):
                packets_log.debug(
                    "Received PUBLISH (q%d, m%s) '%s' (%d bytes)",
                    qos,
                    packet.packet_id,
                    packet.topic,
                    len(packet.payload),
                )
            self._owner._deliver(InboundMessage(packet.topic, packet.payload, packet.retain))
        elif isinstance(packet, mqtt5.PubAckPacket | mqtt5.SubAckPacket | mqtt5.UnsubAckPacket):
            self._acked(packet.packet_id, packet)
        elif isinstance(packet, mqtt5.PingRespPacket):
            pass
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.PubRelPacket):
            self._incoming_qos2.discard(packet.packet_id)
            acks.append(_ack(0x70, packet.packet_id))
        elif isinstance(packet, mqtt5.DisconnectPacket):
            reason = packet.reason_code.name
            log.warning(
                "mqtt %s: the broker disconnected (%s%s)",
                self._owner.client_id,
                reason,
                f": {packet.reason_str}" if packet.reason_str else "",
            )
            self._close()
        else:  # CONNECT, SUBSCRIBE, PUBREC/PUBCOMP (we never publish QoS 2), AUTH...
            self._protocol_error(f"unexpected {type(packet).__name__} from the broker")

    def _acked(self, packet_id: int, packet: mqtt5.Packet) -> None:
        entry = self._acks.pop(packet_id, None)
        if packet_id in self._in_flight:
            self._in_flight.discard(packet_id)
            self._credit += 1
            if self._backlog:
                self._send_backlog()
        if entry is None:
            return
        future, handle = entry
        if handle is not None:
            handle.cancel()
        if future.done():
            return
        if isinstance(packet, mqtt5.PubAckPacket) and packet.reason_code.value >= 0x80:
            reason = packet.reason_code.name
            future.set_exception(TransportUnavailable(f"the broker refused the publish: {reason}"))
        else:
            future.set_result(packet)

    def _protocol_error(self, message: str) -> None:
        log.warning("mqtt %s: %s; reconnecting", self._owner.client_id, message)
        self._failure = self._failure or message
        if self.transport is not None:
            self.transport.abort()

    # -- outbound -------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        """Queue bytes for the socket; one write per turn of the event loop."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.transport is None or not out:
            return
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self._last_sent = self._loop.time()

    def _new_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._acks and self._next_id not in self._in_flight:
                return self._next_id
        raise TransportUnavailable("no free MQTT packet id")

    def _send_backlog(self) -> None:
        while self._credit > 0 and self._backlog:
            waiting = self._backlog.popleft()
            if not waiting.future.done():  # else: it timed out while it waited
                self._send_publish(waiting)

    def _expect(self, packet_id: int, timeout: float, what: str) -> asyncio.Future[object]:
        future: asyncio.Future[object] = self._loop.create_future()
        handle = self._loop.call_later(timeout, self._expired, future, what, timeout)
        self._acks[packet_id] = (future, handle)
        return future

    @staticmethod
    def _expired(future: asyncio.Future[object], what: str, timeout: float) -> None:
        if not future.done():
            future.set_exception(TransportUnavailable(f"no {what} within {timeout:g} s"))

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        expiry: int | None,
        timeout: float,
    ) -> asyncio.Future[object]:
        """Send (or queue, beyond the broker's Receive Maximum) one PUBLISH; the future is
        done at its PUBACK (at once for QoS 0) and fails after ``timeout``."""
        future: asyncio.Future[object] = self._loop.create_future()
        if self.transport is None:
            future.set_exception(TransportUnavailable("MQTT connection lost"))
            return future
        if qos == 0:
            self._send(
                mqtt5.PublishPacket(
                    topic, payload, retain=retain, message_expiry_interval=expiry
                ).write()
            )
            future.set_result(None)
            return future
        handle = self._loop.call_later(timeout, self._expired, future, "PUBACK", timeout)
        outgoing = _Outgoing(topic, payload, retain, expiry, future, handle)
        if self._credit > 0 and not self._backlog:
            self._send_publish(outgoing)
        else:
            self._backlog.append(outgoing)
        return future

    def _send_publish(self, outgoing: _Outgoing) -> None:
        packet_id = self._new_id()
        self._credit -= 1
        self._in_flight.add(packet_id)
        self._acks[packet_id] = (outgoing.future, outgoing.handle)
        self._send(
            mqtt5.PublishPacket(
                outgoing.topic,
                outgoing.payload,
                qos=mqtt5.QoS.AT_LEAST_ONCE,
                retain=outgoing.retain,
                packet_id=packet_id,
                message_expiry_interval=outgoing.expiry,
            ).write()
        )

    async def subscribe(
        self, topic_filter: str, qos: int, timeout: float
    ) -> list[mqtt5.SubAckReasonCode]:
        if self.transport is None:
            raise TransportUnavailable("MQTT connection lost")
        packet_id = self._new_id()
        future = self._expect(packet_id, timeout, "SUBACK")
        self._send(
            mqtt5.SubscribePacket(
                packet_id,
                [mqtt5.TopicFilter(topic_filter, max_qos=_QOS[qos], retain_as_published=False)],
            ).write()
        )
        suback = await future
        assert isinstance(suback, mqtt5.SubAckPacket)
        return suback.reason_codes

    # -- the connection -------------------------------------------------------------------------
    def send_connect(self, packet: mqtt5.ConnectPacket) -> None:
        self._send(packet.write())

    def established(self, connack: mqtt5.ConnAckPacket, keepalive: int) -> None:
        self._credit = connack.receive_max or 65_535
        if connack.server_keep_alive is not None:
            keepalive = connack.server_keep_alive
        self._keepalive = float(keepalive)
        if keepalive > 0:
            self._ticker = self._loop.call_later(self._tick_interval(), self._tick)

    def _tick_interval(self) -> float:
        return max(0.2, self._keepalive / 4)

    def _tick(self) -> None:
        if self.transport is None:
            return
        now = self._loop.time()
        if self._ping_sent is not None and now - self._ping_sent >= self._keepalive:
            self._protocol_error(f"no answer to PINGREQ within {self._keepalive:g} s")
            return
        # Ping when either way has been quiet: a link that hangs while this side keeps
        # publishing (nothing comes back, not even a PUBACK) is found as one that is idle.
        quiet = now - min(self._last_sent, self._last_received)
        if self._ping_sent is None and quiet >= self._keepalive / 2:
            self._ping_sent = now
            self._send(_PINGREQ)
        self._ticker = self._loop.call_later(self._tick_interval(), self._tick)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            if self._rest:
                self.data_received(b"")  # what arrived before the pause; may pause again
            if not self._paused and self.transport is not None:
                self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def disconnect(self) -> None:
        """A clean DISCONNECT (the broker drops the last will), then close."""
        if self.transport is not None:
            self._out.append(_DISCONNECT)
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class MqttTransport:
    """A self-reconnecting MQTT 5 client implementing ``Transport``.

    ``persistent=True`` keeps the broker-side session (subscriptions and queued QoS 1
    messages) across disconnects and restarts for ``session_expiry`` seconds: the central
    service uses it so events published while it restarts are delivered afterwards.

    Between attempts it sleeps a full-jitter delay, uniform in ``[0, window]``: the window
    starts at ``backoff_initial``, doubles after each failed attempt up to ``backoff_max``,
    and is never narrower than the failed attempt took (capped by ``backoff_max``), so a
    fleet whose attempts all fail after the same time spreads out again. ``connect_timeout``
    bounds an attempt until CONNACK; ``timeout`` bounds each later operation (PUBACK, SUBACK).
    ``max_queued_incoming`` (0: no bound) stops reading from the broker while that many
    received messages wait for :meth:`messages`.
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        will: LastWill | None = None,
        persistent: bool = False,
        session_expiry: int = 86_400,
        keepalive: int = 15,
        tls_context: ssl.SSLContext | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        max_queued_incoming: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self._address = address
        self.client_id = client_id
        self._username = username
        self._password = password
        self._will = will
        self._persistent = persistent
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._tls_context = tls_context
        if address.tls and tls_context is None:
            self._tls_context = ssl.create_default_context()
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._filters: dict[str, int] = {}
        self._hooks: list[ConnectHook] = []
        self._max_queued = max_queued_incoming
        self._queue: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connects = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"mqtt:{self.client_id}")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> None:
        await self.publish_nowait(topic, payload, qos=qos, retain=retain, expiry=expiry)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> asyncio.Future[object]:
        """:meth:`publish` without a coroutine: the packet goes out (or waits its turn) now,
        and the future is done at the PUBACK. Fails the future, never raises, offline."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        link = self._link
        if link is None or not self._connected.is_set():
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            future.set_exception(
                TransportUnavailable(f"MQTT client {self.client_id} is not connected")
            )
            return future
        return link.publish(
            topic,
            payload,
            qos=min(qos, 1),  # QoS 2 is not used by this system; sent as QoS 1
            retain=retain,
            expiry=None if expiry is None else max(1, int(expiry)),
            timeout=self.timeout,
        )

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters[topic_filter] = qos
        link = self._link
        if link is not None and self.connected:
            try:
                await self._subscribe(link, topic_filter, qos)
            except TransportUnavailable as exc:
                log.warning("subscribe %s failed (%s); retried on reconnect", topic_filter, exc)

    async def _subscribe(self, link: _Link, topic_filter: str, qos: int) -> None:
        codes = await link.subscribe(topic_filter, min(max(qos, 0), 2), self.timeout)
        refused = [code for code in codes if code.value >= 0x80]
        if refused:
            reason = refused[0].name
            log.warning("mqtt %s: the broker refused %s (%s)", self.client_id, topic_filter, reason)

    def on_connect(self, hook: ConnectHook) -> None:
        self._hooks.append(hook)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        while True:
            message = await self._queue.get()
            if self._max_queued and self._queue.qsize() < self._max_queued:
                link = self._link
                if link is not None:
                    link.resume()
            yield message

    def _deliver(self, message: InboundMessage) -> None:
        self._queue.put_nowait(message)
        if self._max_queued and self._queue.qsize() >= self._max_queued:
            link = self._link
            if link is not None:
                link.pause()

    # -- the connection loop -------------------------------------------------------------------
    def _connect_packet(self) -> mqtt5.ConnectPacket:
        will = None
        if self._will is not None:
            will = mqtt5.Will(
                self._will.topic,
                payload=self._will.payload,
                qos=_QOS[self._will.qos],
                retain=self._will.retain,
            )
        return mqtt5.ConnectPacket(
            self.client_id,
            username=self._username,
            password=None if self._password is None else self._password.encode(),
            clean_start=not self._persistent,
            will=will,
            keep_alive=self._keepalive,
            session_expiry_interval=self._session_expiry if self._persistent else 0,
        )

    async def _connect(self, link: _Link) -> mqtt5.ConnAckPacket:
        """TCP (and TLS) connect, CONNECT, CONNACK: within ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: link,
                    self._address.host,
                    self._address.port,
                    ssl=tls,
                    server_hostname=self._address.host if tls is not None else None,
                )
                link.send_connect(self._connect_packet())
                connack = await link.connack
        except TimeoutError:
            raise MqttError(
                f"no CONNACK from {self._address.host}:{self._address.port}"
                f" within {self._connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, TLS verification...
            raise MqttError(str(exc) or type(exc).__name__) from exc
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            reason = connack.reason_code.name
            raise MqttError(
                f"the broker refused the connection: {reason}"
                + (f" ({connack.reason_str})" if connack.reason_str else "")
            )
        return connack

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_initial
        while not self._closing:
            link = _Link(self, loop)
            started, established = loop.time(), False
            try:
                connack = await self._connect(link)
                link.established(connack, self._keepalive)
                established = True
                self._link = link
                for topic_filter, qos in self._filters.items():
                    await self._subscribe(link, topic_filter, qos)
                self._connected.set()
                self.connects += 1
                self.last_error = None
                delay = self._backoff_initial
                log.info(
                    "mqtt %s connected to %s:%s",
                    self.client_id,
                    self._address.host,
                    self._address.port,
                )
                for hook in self._hooks:
                    try:
                        await hook()
                    except TransportUnavailable as exc:
                        log.warning("on-connect hook failed: %s", exc)
                    except Exception:
                        log.exception("on-connect hook failed")
                reason = await link.closed
                raise MqttError(f"connection lost: {reason or 'closed by the broker'}")
            except (MqttError, TransportUnavailable) as exc:
                self.last_error = str(exc)
                if self.connected:
                    log.warning("mqtt %s lost connection: %s", self.client_id, exc)
                else:
                    log.debug("mqtt %s cannot connect: %s", self.client_id, exc)
                link.abort()
            except asyncio.CancelledError:
                if established:
                    link.disconnect()
                else:
                    link.abort()
                raise
            finally:
                self._connected.clear()
                self._link = None
            if self._closing:
                break
            # Full jitter: many gateways reconnecting after a broker restart spread out. An
            # attempt that failed after a while (a timeout) widens the window to its length:
            # attempts failing together after a fixed time must not retry together.
            window = delay if established else max(delay, loop.time() - started)
            await asyncio.sleep(self._rng.uniform(0, min(self._backoff_max, window)))
            delay = min(self._backoff_max, delay * 2)
