"""The real :class:`~parking_protocol.transport.Transport`: MQTT 5 to Mosquitto via aiomqtt.

Needs the ``paho-mqtt``/``aiomqtt`` packages (in both the ``gateway`` and ``server`` extras),
imported only when this module is. It keeps one connection alive with capped, jittered
exponential backoff, re-subscribes on every connect, sets TCP_NODELAY on the socket (without
it Nagle's algorithm meets delayed ACKs and a round trip costs 40-90 ms instead of <1 ms),
and registers a last will.

A connection attempt fails as soon as the socket closes before CONNACK (a TCP front or load
balancer with no healthy broker behind it accepts and closes; so does Mosquitto at
``max_connections``) and otherwise within ``connect_timeout``. Waiting out a fixed timeout
instead would line the whole fleet's retries up again after an outage: everyone's attempt
would end at the same moment, whatever jitter came before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from parking_protocol.transport import ConnectHook, InboundMessage, LastWill, TransportUnavailable

__all__ = ["BrokerAddress", "MqttTransport", "parse_broker_url"]

log = logging.getLogger(__name__)

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


_PENDING_PUBLISHES_WARNING = 5_000


@functools.lru_cache(maxsize=64)
def _expiry_properties(seconds: int) -> Properties:
    """PUBLISH properties with a message expiry, built once per value (paho only reads
    them: building one per publish was 4 % of a busy service's CPU)."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.MessageExpiryInterval = seconds
    return properties


def _drop_socket(client: aiomqtt.Client) -> None:
    """Close the socket of a client cancelled before CONNACK (closed while its link hangs):
    aiomqtt (2.5) leaves it open with its reader and its housekeeping task, and paho's
    ``__del__`` then closes it after the event loop is gone ("Event loop is closed")."""
    with contextlib.suppress(Exception):
        client._client._reset_sockets()


class _Client(aiomqtt.Client):
    """``aiomqtt.Client`` with two changes to how it hooks paho into the event loop.

    * The connect fails at once when the socket closes before CONNACK. aiomqtt (2.5)
      ignores paho's ``on_disconnect`` until the connection is established, so a connection
      accepted and then closed before CONNACK left ``__aenter__`` waiting for its whole
      timeout. paho reports that close through ``on_disconnect`` (``loop_read`` reads EOF,
      closes the socket and calls it): here it fails the pending connect instead.
    * Readers and writers are registered only while the socket is still the client's own.
      aiomqtt registered them later, by file number: when the socket had closed meanwhile
      (a broker killed mid-traffic), that failed with EBADF, or, once the number was reused
      by the next connection's socket, took over that socket's reader or writer.
    """

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def read() -> None:
            # loop_read may raise (a broken pipe): the connection is lost.
            try:
                while True:
                    client.loop_read()
                    # An SSL socket may hold decoded bytes that loop_read left
                    # (eclipse-paho/paho.mqtt.python#131).
                    pending = getattr(client.socket(), "pending", None)
                    if pending is None or pending() <= 0:
                        break
            except Exception as exc:
                self._lose(exc)

        def register() -> None:
            current = client.socket()
            if current is sock and current is not None:
                self._loop.add_reader(current.fileno(), read)
                self._misc_task = self._loop.create_task(self._misc_loop())

        # paho calls this from the executor thread running connect().
        self._loop.call_soon_threadsafe(register)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho may call this from the executor thread running connect().
        self._loop.call_soon_threadsafe(self._add_writer, client, sock)

    def _add_writer(self, client: paho.Client, sock: Any) -> None:
        current = client.socket()
        if current is sock and current is not None:
            self._loop.add_writer(current.fileno(), self._guarded, client.loop_write)

    def _guarded(self, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:  # a broken pipe: the connection is lost
            self._lose(exc)

    def _lose(self, exc: Exception) -> None:
        if not self._disconnected.done():
            self._disconnected.set_exception(exc)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        pending = self._connected
        if pending.done():
            super()._on_disconnect(client, userdata, flags, reason_code, properties)
            return
        error = aiomqtt.MqttError(f"connection closed before CONNACK ({reason_code})")

        def fail() -> None:
            if not pending.done():
                pending.set_exception(error)
                # __aenter__ may already have failed on its own (the socket closed under
                # connect()) and never await this: no "exception was never retrieved".
                pending.exception()

        # paho may call this from the executor thread running connect().
        self._loop.call_soon_threadsafe(fail)


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
        self._timeout = timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._filters: dict[str, int] = {}
        self._hooks: list[ConnectHook] = []
        self._queue: asyncio.Queue[InboundMessage] = asyncio.Queue(max_queued_incoming)
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
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
        client = self._client
        if client is None or not self.connected:
            raise TransportUnavailable(f"MQTT client {self.client_id} is not connected")
        properties = None if expiry is None else _expiry_properties(max(1, int(expiry)))
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except aiomqtt.MqttError as exc:
            raise TransportUnavailable(str(exc)) from exc

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters[topic_filter] = qos
        client = self._client
        if client is not None and self.connected:
            try:
                await client.subscribe(topic_filter, qos=qos)
            except aiomqtt.MqttError as exc:
                log.warning("subscribe %s failed (%s); retried on reconnect", topic_filter, exc)

    def on_connect(self, hook: ConnectHook) -> None:
        self._hooks.append(hook)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self._queue.get()

    # -- the connection loop -------------------------------------------------------------------
    def _make_client(self) -> _Client:
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry if self._persistent else 0
        client = _Client(
            self._address.host,
            self._address.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=self._keepalive,
            clean_start=not self._persistent,
            properties=properties,
            tls_context=self._tls_context,
            socket_options=[TCP_NODELAY],
            timeout=self._connect_timeout,  # until CONNACK; see _run
        )
        # paho's own TCP connect (and TLS handshake) timeout, default 5 s.
        client._client.connect_timeout = self._connect_timeout
        # aiomqtt warns from 10 publishes awaiting their PUBACK: a service answering many
        # gates at once has hundreds, normally. A broker that stops acknowledging shows as
        # publish timeouts instead.
        client.pending_calls_threshold = _PENDING_PUBLISHES_WARNING
        return client

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_initial
        while not self._closing:
            client = self._make_client()
            started, established = loop.time(), False
            try:
                async with client:
                    established = True
                    client.timeout = self._timeout
                    self._client = client
                    for topic_filter, qos in self._filters.items():
                        await client.subscribe(topic_filter, qos=qos)
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
                        except (aiomqtt.MqttError, TransportUnavailable) as exc:
                            log.warning("on-connect hook failed: %s", exc)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, str):
                            payload = payload.encode()
                        elif not isinstance(payload, bytes | bytearray):
                            payload = b"" if payload is None else str(payload).encode()
                        await self._queue.put(
                            InboundMessage(message.topic.value, bytes(payload), message.retain)
                        )
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                if self.connected:
                    log.warning("mqtt %s lost connection: %s", self.client_id, exc)
                else:
                    log.debug("mqtt %s cannot connect: %s", self.client_id, exc)
            except asyncio.CancelledError:
                if not established:
                    _drop_socket(client)
                raise
            finally:
                self._connected.clear()
                self._client = None
            if self._closing:
                break
            # Full jitter: many gateways reconnecting after a broker restart spread out. An
            # attempt that failed after a while (a timeout) widens the window to its length:
            # attempts failing together after a fixed time must not retry together.
            window = delay if established else max(delay, loop.time() - started)
            await asyncio.sleep(self._rng.uniform(0, min(self._backoff_max, window)))
            delay = min(self._backoff_max, delay * 2)
