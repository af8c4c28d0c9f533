"""The MQTT transport interface both sides code against, and an in-memory broker.

Real deployments use :class:`parking_protocol.mqtt.MqttTransport` (MQTT 5 to Mosquitto,
asyncio with the ``mqtt5`` codec). Unit tests and the seeded deterministic simulation use
:class:`InMemoryBroker`, which implements the parts of MQTT this system relies on:
``+``/``#`` wildcards, retained messages, last wills, ``$share/`` groups, and cutting a
client off (a partition).

>>> import asyncio
>>> async def demo() -> bytes:
...     broker = InMemoryBroker()
...     a, b = broker.client("a"), broker.client("b")
...     await a.start(); await b.start()
...     await b.subscribe("x/+")
...     await a.publish("x/1", b"hi")
...     return (await anext(aiter(b.messages()))).payload
>>> asyncio.run(demo())
b'hi'
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "InMemoryBroker",
    "InMemoryTransport",
    "InboundMessage",
    "LastWill",
    "RouteFaults",
    "Transport",
    "TransportUnavailable",
    "topic_matches",
]


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class TransportUnavailable(ConnectionError):
    """Publishing while not connected to the broker."""


ConnectHook = Callable[[], Awaitable[None]]


@runtime_checkable
class Transport(Protocol):
    """A connection to an MQTT broker, reconnecting on its own.

    Subscriptions are remembered and re-applied on every (re)connect; ``on_connect`` hooks
    run after each successful connect (publish a birth message there).
    """

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def wait_connected(self, timeout: float | None = None) -> bool: ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> None:
        """Publish; with QoS 1, return once the broker has it (PUBACK).

        ``expiry`` (seconds) is the MQTT 5 message expiry: a broker drops the message
        instead of delivering it late. Raises :class:`TransportUnavailable` when offline.
        """

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> asyncio.Future[object]:
        """:meth:`publish` started at once, without a coroutine (a busy publisher sends
        hundreds at a time): the future is done when :meth:`publish` would return, and
        holds its :class:`TransportUnavailable` when offline."""
        ...

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def on_connect(self, hook: ConnectHook) -> None: ...

    def messages(self) -> AsyncIterator[InboundMessage]: ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` and ``#`` (``$share/group/`` prefix stripped)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part not in ("+", t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@dataclass
class RouteFaults:
    """Seeded delivery faults: QoS 1 redelivery (duplicates), delays that reorder, and drops.

    ``drop`` is the chance that a delivery is silently lost although its publisher already
    had its PUBACK (a broker restarted without persistence loses what it had accepted): the
    publisher cannot tell, only an answer that never comes can. Each delivery to each
    subscriber draws on its own; a dropped one is not duplicated either.
    """

    rng: random.Random
    duplicate: float = 0.0
    max_delay: float = 0.0
    drop: float = 0.0
    duplicated: int = 0
    """How many deliveries were doubled so far (for reports)."""
    dropped: int = 0
    """How many deliveries were lost so far (for reports)."""


@dataclass
class InMemoryBroker:
    """A tiny in-process broker for tests and deterministic simulation (not for production).

    ``persistent`` clients keep a session: messages for them while they are disconnected are
    queued and delivered when a client with the same id connects again (as Mosquitto does
    for ``clean_start=false``). ``faults`` injects duplicates, reordering and drops; ``observer``
    sees every published message.
    """

    retained: dict[str, bytes] = field(default_factory=dict)
    clients: dict[str, InMemoryTransport] = field(default_factory=dict)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    up: bool = True
    faults: RouteFaults | None = None
    observer: Callable[[str, bytes], None] | None = None
    keep_log: bool = True
    _sessions: dict[str, tuple[list[str], list[InboundMessage]]] = field(default_factory=dict)
    _share_rr: itertools.count[int] = field(default_factory=itertools.count)

    def client(
        self, client_id: str, will: LastWill | None = None, *, persistent: bool = False
    ) -> InMemoryTransport:
        return InMemoryTransport(self, client_id, will, persistent=persistent)

    # -- fault injection -------------------------------------------------------------------
    async def cut(self, client_id: str) -> None:
        """Drop a client's connection abruptly (its last will is published)."""
        client = self.clients.get(client_id)
        if client is not None:
            await client._lose_connection(publish_will=True)

    async def heal(self, client_id: str) -> None:
        """Let a cut client connect again."""
        client = self.clients.get(client_id)
        if client is not None and self.up:
            await client._connect()

    async def stop(self) -> None:
        """The broker goes down: every client loses its connection (wills are not sent)."""
        self.up = False
        for client in list(self.clients.values()):
            await client._lose_connection(publish_will=False)

    async def restart(self) -> None:
        self.up = True
        for client in list(self.clients.values()):
            if client._wants_connection:
                await client._connect()

    # -- routing -----------------------------------------------------------------------------
    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.keep_log:
            self.published.append((topic, payload))
        if self.observer is not None:
            self.observer(topic, payload)
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        shared_groups: dict[str, list[InMemoryTransport]] = {}
        message = InboundMessage(topic, payload, retain=False)
        for client in self.clients.values():
            if not client.connected and not client.persistent:
                continue
            for topic_filter in client._filters:
                if not topic_matches(topic_filter, topic):
                    continue
                if topic_filter.startswith("$share/"):
                    group = topic_filter.split("/", 2)[1] + "|" + topic_filter.split("/", 2)[2]
                    shared_groups.setdefault(group, []).append(client)
                else:
                    self._send(client, message)
                break
        for members in shared_groups.values():
            chosen = members[next(self._share_rr) % len(members)]
            self._send(chosen, message)
        for client_id, (filters, backlog) in self._sessions.items():
            if client_id not in self.clients and any(topic_matches(f, topic) for f in filters):
                backlog.append(message)

    def _send(self, client: InMemoryTransport, message: InboundMessage) -> None:
        faults = self.faults
        if faults is None:
            client._deliver(message)
            return
        # No draw when drops are off: the duplicate/delay stream stays as it was.
        if faults.drop > 0 and faults.rng.random() < faults.drop:
            faults.dropped += 1
            return
        copies = 2 if faults.rng.random() < faults.duplicate else 1
        faults.duplicated += copies - 1
        for _ in range(copies):
            delay = faults.rng.uniform(0, faults.max_delay) if faults.max_delay > 0 else 0.0
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, client._deliver, message)
            else:
                client._deliver(message)


class InMemoryTransport:
    """One client of an :class:`InMemoryBroker`, implementing :class:`Transport`."""

    def __init__(
        self,
        broker: InMemoryBroker,
        client_id: str,
        will: LastWill | None,
        *,
        persistent: bool = False,
    ) -> None:
        self._broker = broker
        self.client_id = client_id
        self._will = will
        self.persistent = persistent
        self._backlog: list[InboundMessage] = []
        self._filters: list[str] = []
        self._queue: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._hooks: list[ConnectHook] = []
        self._wants_connection = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._wants_connection = True
        existing = self._broker.clients.get(self.client_id)
        if existing is not None and existing is not self:
            # MQTT: a new connection with the same client id takes over.
            await existing._lose_connection(publish_will=True)
            if existing.persistent:
                self._broker._sessions[self.client_id] = (
                    list(existing._filters),
                    existing._backlog,
                )
        self._broker.clients[self.client_id] = self
        session = self._broker._sessions.pop(self.client_id, None)
        if session is not None and self.persistent:
            for topic_filter in session[0]:
                if topic_filter not in self._filters:
                    self._filters.append(topic_filter)
            self._backlog.extend(session[1])
        if self._broker.up:
            await self._connect()

    async def close(self) -> None:
        self._wants_connection = False
        self._connected.clear()
        if self._broker.clients.get(self.client_id) is self:
            del self._broker.clients[self.client_id]
            if self.persistent:
                self._broker._sessions[self.client_id] = (list(self._filters), self._backlog)

    def crash(self) -> None:
        """The process holding this connection dies: no DISCONNECT, its queue is lost."""
        self._wants_connection = False
        if self._broker.clients.get(self.client_id) is self:
            del self._broker.clients[self.client_id]
            if self.persistent:
                self._broker._sessions[self.client_id] = (list(self._filters), self._backlog)
        if self.connected:
            self._connected.clear()
            if self._will is not None:
                self._broker._route(self._will.topic, self._will.payload, self._will.retain)

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
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if not self.connected:
            future.set_exception(TransportUnavailable(f"{self.client_id} is not connected"))
        else:
            self._broker._route(topic, payload, retain)
            future.set_result(None)
        return future

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        if self.connected:
            self._send_retained(topic_filter)

    def on_connect(self, hook: ConnectHook) -> None:
        self._hooks.append(hook)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self._queue.get()

    # -- broker side ---------------------------------------------------------------------------
    def _deliver(self, message: InboundMessage) -> None:
        if self.connected:
            self._queue.put_nowait(message)
        elif self.persistent:
            # A persistent session's messages wait in the broker while the client is away.
            self._backlog.append(message)

    def _send_retained(self, topic_filter: str) -> None:
        for topic, payload in list(self._broker.retained.items()):
            if topic_matches(topic_filter, topic) and not topic_filter.startswith("$share/"):
                self._deliver(InboundMessage(topic, payload, retain=True))

    async def _connect(self) -> None:
        if self.connected or not self._wants_connection:
            return
        self._connected.set()
        backlog, self._backlog = self._backlog, []
        for message in backlog:
            self._queue.put_nowait(message)
        for topic_filter in self._filters:
            self._send_retained(topic_filter)
        for hook in self._hooks:
            await hook()

    async def _lose_connection(self, *, publish_will: bool) -> None:
        if not self.connected:
            return
        self._connected.clear()
        if publish_will and self._will is not None:
            self._broker._route(self._will.topic, self._will.payload, self._will.retain)
