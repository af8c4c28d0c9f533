from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.transport import (
    InboundMessage,
    InMemoryBroker,
    LastWill,
    Transport,
    TransportUnavailable,
    topic_matches,
)
from qrpark.services import MosquittoProcess


async def next_message(it: AsyncIterator[InboundMessage], timeout: float = 5) -> InboundMessage:
    return await asyncio.wait_for(anext(it), timeout)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/+", "a/b/c", False),
        ("$share/g/a/+", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


async def test_in_memory_broker_delivers_retains_and_fires_wills() -> None:
    broker = InMemoryBroker()
    will = LastWill("s/gw", b"offline", retain=True)
    gw = broker.client("gw", will=will)
    watcher = broker.client("watcher")
    await gw.start()
    await watcher.start()
    assert isinstance(gw, Transport)
    await gw.publish("s/gw", b"online", retain=True)
    await watcher.subscribe("s/+")
    messages = watcher.messages()
    first = await next_message(messages)
    assert (first.payload, first.retain) == (b"online", True)
    await broker.cut("gw")
    assert (await next_message(messages)).payload == b"offline"
    with pytest.raises(TransportUnavailable):
        await gw.publish("s/gw", b"x")
    await broker.heal("gw")
    await gw.publish("s/gw", b"back")
    assert (await next_message(messages)).payload == b"back"


async def test_in_memory_shared_subscription_splits_the_load() -> None:
    broker = InMemoryBroker()
    a, b, pub = broker.client("a"), broker.client("b"), broker.client("p")
    for client in (a, b, pub):
        await client.start()
    await a.subscribe("$share/g/e/+")
    await b.subscribe("$share/g/e/+")
    for i in range(10):
        await pub.publish(f"e/{i}", b"x")
    assert a._queue.qsize() + b._queue.qsize() == 10
    assert a._queue.qsize() == 5


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker:1884", "broker", 1884, False),
        ("mqtts://broker", "broker", 8883, True),
        ("127.0.0.1:1883", "127.0.0.1", 1883, False),
    ],
)
def test_broker_urls(url: str, host: str, port: int, tls: bool) -> None:
    address = parse_broker_url(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)


@pytest.mark.parametrize("url", ["http://x:1", "mqtt://:1883", "mqtt://h:abc", "mqtt://h:70000"])
def test_bad_broker_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"broker URL|scheme"):
        parse_broker_url(url)


@pytest.mark.broker
async def test_mqtt_transport_round_trip_and_tcp_nodelay(mosquitto: MosquittoProcess) -> None:
    address = parse_broker_url(mosquitto.url)
    a = MqttTransport(address, "t-a")
    b = MqttTransport(address, "t-b")
    await b.subscribe("qt/#")
    await a.start()
    await b.start()
    try:
        assert await a.wait_connected(5)
        assert await b.wait_connected(5)
        assert a._link is not None and a._link.transport is not None
        sock = a._link.transport.get_extra_info("socket")
        assert a.timeout == 10  # operations, not connect
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        messages = b.messages()
        await a.publish("qt/x", b"hello")
        message = await next_message(messages)
        assert (message.topic, message.payload) == ("qt/x", b"hello")
    finally:
        await a.close()
        await b.close()


@pytest.mark.broker
async def test_mqtt_transport_reconnects_after_broker_restart_and_resubscribes() -> None:
    broker = MosquittoProcess().start()
    try:
        address = parse_broker_url(broker.url)
        sub = MqttTransport(address, "t-sub", backoff_initial=0.05, backoff_max=0.2)
        pub = MqttTransport(address, "t-pub", backoff_initial=0.05, backoff_max=0.2)
        births: list[int] = []

        async def birth() -> None:
            births.append(1)

        sub.on_connect(birth)
        await sub.subscribe("r/#")
        await sub.start()
        await pub.start()
        assert await sub.wait_connected(5) and await pub.wait_connected(5)
        broker.kill()
        for _ in range(100):
            if not sub.connected:
                break
            await asyncio.sleep(0.05)
        assert not sub.connected
        with pytest.raises(TransportUnavailable):
            await pub.publish("r/1", b"lost")
        broker.start()
        assert await sub.wait_connected(10) and await pub.wait_connected(10)
        await pub.publish("r/1", b"after")
        message = await next_message(sub.messages())
        assert message.payload == b"after"
        assert len(births) == 2
        await sub.close()
        await pub.close()
    finally:
        broker.stop()


class _Front:
    """A TCP listener on a free port: counts connections, closes each at once or holds it."""

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.accepted: list[float] = []
        self.first = asyncio.Event()
        self.third = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Front:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(asyncio.get_running_loop().time())
        self.first.set()
        if len(self.accepted) == 3:
            self.third.set()
        if self.hold:
            self._held.append(writer)  # a broker that never answers CONNECT
            self.readers.append(reader)
            return
        writer.close()  # a front with no broker behind it


class _Windows(random.Random):
    """Records the upper bound of every backoff window drawn."""

    def __init__(self) -> None:
        super().__init__(1)
        self.windows: list[float] = []
        self.drawn = asyncio.Event()

    def uniform(self, a: float, b: float) -> float:
        self.windows.append(b)
        self.drawn.set()
        return super().uniform(a, b)


async def test_mqtt_connect_fails_at_once_when_the_socket_closes_before_connack() -> None:
    # connect_timeout=10: only noticing the close can end each attempt in milliseconds.
    async with _Front() as front:
        transport = MqttTransport(
            parse_broker_url(f"127.0.0.1:{front.port}"),
            "t-front",
            connect_timeout=10,
            backoff_initial=0.01,
            backoff_max=0.02,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await transport.start()
        try:
            await asyncio.wait_for(front.third.wait(), 5)
            assert front.accepted[2] - started < 1.0
            assert not transport.connected
            assert "closed before CONNACK" in (transport.last_error or "")
        finally:
            await transport.close()


async def test_mqtt_connect_times_out_and_widens_the_backoff_to_the_attempt() -> None:
    # A listener that never sends CONNACK: the attempt ends after connect_timeout (not the
    # 10 s operation timeout), and the next jitter window is at least that long.
    windows = _Windows()
    async with _Front(hold=True) as front:
        transport = MqttTransport(
            parse_broker_url(f"127.0.0.1:{front.port}"),
            "t-silent",
            connect_timeout=0.3,
            backoff_initial=0.01,
            backoff_max=10,
            rng=windows,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await transport.start()
        try:
            await asyncio.wait_for(windows.drawn.wait(), 5)  # the first attempt ended
            assert 0.3 <= loop.time() - started < 2.0
            assert 0.3 <= windows.windows[0] < 2.0
            assert not transport.connected
        finally:
            await transport.close()


async def test_closing_while_the_broker_never_answers_leaves_no_socket_or_task() -> None:
    """A gateway stopped while its link hangs (connected, no CONNACK): nothing of the
    attempt may outlive the close (a socket closed after the event loop is gone warns)."""
    async with _Front(hold=True) as front:
        transport = MqttTransport(
            parse_broker_url(f"127.0.0.1:{front.port}"), "t-hung", connect_timeout=30
        )
        await transport.start()
        await asyncio.wait_for(_accepted(front), 5)
        [reader] = front.readers
        await transport.close()
        # The broker's side sees the CONNECT, then the end of the stream.
        received = await asyncio.wait_for(reader.read(), 2)
        assert received.startswith(b"\x10")  # CONNECT
        assert reader.at_eof()
        leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("mqtt:")]
        assert leftover == []


async def _accepted(front: _Front) -> None:
    await front.first.wait()
    await asyncio.sleep(0.05)  # the CONNECT is on its way; CONNACK never comes


_DYING_CLIENT = """
import asyncio, sys
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.transport import LastWill
async def main():
    t = MqttTransport(parse_broker_url(sys.argv[1]), "t-dying",
                      will=LastWill("w/gw", b"offline"), keepalive=2)
    await t.start()
    assert await t.wait_connected(5)
    print("connected", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.broker
async def test_mqtt_last_will_is_published_when_a_client_dies(
    mosquitto: MosquittoProcess,
) -> None:
    watcher = MqttTransport(parse_broker_url(mosquitto.url), "t-watch")
    await watcher.subscribe("w/gw")
    await watcher.start()
    assert await watcher.wait_connected(5)
    dying = subprocess.Popen(
        [sys.executable, "-c", _DYING_CLIENT, mosquitto.url], stdout=subprocess.PIPE
    )
    try:
        assert dying.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(dying.stdout.readline), 10)
        assert line.strip() == b"connected"
        dying.kill()  # no DISCONNECT packet: the broker must publish the will
        message = await next_message(watcher.messages(), timeout=10)
        assert message.payload == b"offline"
    finally:
        dying.kill()
        dying.wait()
        if dying.stdout is not None:
            dying.stdout.close()
        await watcher.close()


async def test_in_memory_persistent_session_keeps_messages_across_a_crash() -> None:
    broker = InMemoryBroker()
    publisher = broker.client("gw")
    first = broker.client("central", persistent=True)
    for client in (publisher, first):
        await client.start()
    await first.subscribe("e/#")
    await publisher.publish("e/1", b"before")
    first.crash()  # its unread queue dies with it
    await publisher.publish("e/2", b"while away")
    second = broker.client("central", persistent=True)
    await second.start()
    message = await next_message(second.messages())
    assert (message.topic, message.payload) == ("e/2", b"while away")


async def test_in_memory_cut_persistent_client_gets_backlog_only_after_heal() -> None:
    broker = InMemoryBroker()
    publisher = broker.client("gw")
    central = broker.client("central", persistent=True)
    for client in (publisher, central):
        await client.start()
    await central.subscribe("e/#")
    await broker.cut("central")
    await publisher.publish("e/1", b"queued")
    assert central._queue.empty()
    await broker.heal("central")
    assert (await next_message(central.messages())).payload == b"queued"


async def test_in_memory_faults_duplicate_and_delay_deliveries() -> None:
    import random

    from parking_protocol.transport import RouteFaults

    broker = InMemoryBroker(faults=RouteFaults(random.Random(3), duplicate=1.0, max_delay=0.01))
    publisher, sub = broker.client("p"), broker.client("s")
    for client in (publisher, sub):
        await client.start()
    await sub.subscribe("x")
    await publisher.publish("x", b"once")
    messages = sub.messages()
    assert (await next_message(messages)).payload == b"once"
    assert (await next_message(messages)).payload == b"once"


async def test_in_memory_faults_drop_deliveries_after_the_publish_succeeded() -> None:
    from parking_protocol.transport import RouteFaults

    faults = RouteFaults(random.Random(5), drop=0.5)
    broker = InMemoryBroker(faults=faults)
    publisher, a, b = broker.client("p"), broker.client("a"), broker.client("b")
    for client in (publisher, a, b):
        await client.start()
    await a.subscribe("x/+")
    await b.subscribe("x/+")
    for i in range(40):
        await publisher.publish(f"x/{i}", b"m")  # returns: the publisher cannot tell
    received = a._queue.qsize() + b._queue.qsize()
    assert 0 < faults.dropped < 80  # each delivery to each subscriber draws on its own
    assert received == 80 - faults.dropped
    faults.drop = 1.0
    await publisher.publish("x/last", b"m")
    assert a._queue.qsize() + b._queue.qsize() == received
