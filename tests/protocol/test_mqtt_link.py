"""The MQTT transport's own protocol handling, against a scripted broker and Mosquitto.

The scripted broker (a TCP server speaking MQTT through the same ``mqtt5`` codec) makes the
edge cases happen on demand: packets split anywhere and packed together, a Receive Maximum
of 2, acks that never come or refuse, garbage, silence. Everything that needs a real broker
runs against Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import mqtt5
import pytest

from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.transport import InboundMessage, TransportUnavailable
from qrpark.services import MosquittoProcess


class _Peer:
    """One client connection, seen from the scripted broker."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = b""

    async def read(self, timeout: float = 5) -> mqtt5.Packet:
        while True:
            if self._buffer:
                try:
                    packet, used = mqtt5.read(memoryview(self._buffer))
                except IndexError:
                    pass  # not complete yet
                else:
                    self._buffer = self._buffer[used:]
                    return packet
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError
            self._buffer += data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def connack(self, **fields: object) -> mqtt5.ConnectPacket:
        connect = await self.read()
        assert isinstance(connect, mqtt5.ConnectPacket)
        await self.send(mqtt5.ConnAckPacket(**fields).write())  # type: ignore[arg-type]
        return connect


Script = Callable[[_Peer], Awaitable[None]]


class _ScriptedBroker:
    """Runs ``script`` for every connection; ``peers`` are the connections so far."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.peers: list[_Peer] = []
        self.connected = asyncio.Condition()
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _ScriptedBroker:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for peer in self.peers:
            peer.writer.close()
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        assert self.errors == []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(reader, writer)
        self.peers.append(peer)
        async with self.connected:
            self.connected.notify_all()
        try:
            await self.script(peer)
        except (EOFError, ConnectionError):
            pass
        except Exception as exc:  # an assertion in the script: reported at exit
            self.errors.append(exc)

    async def wait_peers(self, count: int, timeout: float = 5) -> None:
        async with self.connected:
            enough = self.connected.wait_for(lambda: len(self.peers) >= count)
            await asyncio.wait_for(enough, timeout)


def _transport(url: str, **options: object) -> MqttTransport:
    return MqttTransport(
        parse_broker_url(url),
        "t-link",
        backoff_initial=0.01,
        backoff_max=0.05,
        **options,  # type: ignore[arg-type]
    )


async def _take(messages: AsyncIterator[InboundMessage], count: int) -> list[InboundMessage]:
    return [await asyncio.wait_for(anext(messages), 5) for _ in range(count)]


async def test_packets_split_anywhere_or_packed_together_are_all_delivered_and_acked() -> None:
    acked: list[int] = []
    done = asyncio.Event()

    async def script(peer: _Peer) -> None:
        await peer.connack()
        stream = (
            b"".join(
                mqtt5.PublishPacket(
                    f"t/{i}", bytes([i]) * (i * 70), qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=i + 1
                ).write()
                for i in range(6)
            )
            + mqtt5.PublishPacket("t/q0", b"zero").write()
        )
        # Byte by byte for the first 300 bytes (a remaining length split in two), then
        # in uneven chunks, the last packets in one write.
        for index in range(300):
            await peer.send(stream[index : index + 1])
        rest = stream[300:]
        await peer.send(rest[:7])
        await peer.send(rest[7:])
        while len(acked) < 6:
            packet = await peer.read()
            assert isinstance(packet, mqtt5.PubAckPacket)
            acked.append(packet.packet_id)
        done.set()
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url)
        await transport.start()
        try:
            received = await _take(transport.messages(), 7)
            assert [(m.topic, m.payload) for m in received] == [
                *((f"t/{i}", bytes([i]) * (i * 70)) for i in range(6)),
                ("t/q0", b"zero"),
            ]
            await asyncio.wait_for(done.wait(), 5)
            assert acked == [1, 2, 3, 4, 5, 6]
        finally:
            await transport.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x30\xff\xff\xff\xff\x01",  # a remaining length of five bytes
        b"\x30\x03\x00\x05ab",  # a topic longer than the packet
        b"\xf0\x00",  # reserved packet type
        mqtt5.SubscribePacket(1, [mqtt5.TopicFilter("x")]).write(),  # a client's packet
    ],
)
async def test_a_malformed_or_unexpected_packet_ends_the_connection_and_it_reconnects(
    garbage: bytes,
) -> None:
    async def script(peer: _Peer) -> None:
        await peer.connack()
        if len(broker.peers) == 1:
            await peer.send(garbage)
        else:
            await peer.send(mqtt5.PublishPacket("t/after", b"ok").write())
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url)
        await transport.start()
        try:
            [message] = await _take(transport.messages(), 1)
            assert message.payload == b"ok"
            assert len(broker.peers) == 2
            assert transport.connects == 2
        finally:
            await transport.close()


async def test_publishes_beyond_the_receive_maximum_wait_for_a_puback() -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def script(peer: _Peer) -> None:
        await peer.connack(receive_max=2)
        for _ in range(2):
            packet = await peer.read()
            assert isinstance(packet, mqtt5.PublishPacket) and packet.packet_id is not None
            seen.append(packet.packet_id)
        with pytest.raises(TimeoutError):  # no third one while two are unacknowledged
            await peer.read(timeout=0.3)
        release.set()
        for acked in range(5):  # each PUBACK makes room for one more
            await peer.send(mqtt5.PubAckPacket(seen[acked]).write())
            if len(seen) < 5:
                packet = await peer.read()
                assert isinstance(packet, mqtt5.PublishPacket) and packet.packet_id is not None
                seen.append(packet.packet_id)
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url)
        await transport.start()
        try:
            assert await transport.wait_connected(5)
            results = asyncio.gather(*(transport.publish(f"t/{i}", b"m") for i in range(5)))
            await asyncio.wait_for(release.wait(), 5)
            assert not results.done()
            await asyncio.wait_for(results, 5)
            assert len(seen) == 5 and len(set(seen)) == 5
        finally:
            await transport.close()


async def test_a_publish_without_puback_times_out_and_a_refused_one_raises() -> None:
    async def script(peer: _Peer) -> None:
        await peer.connack()
        silent = await peer.read()  # never acknowledged
        assert isinstance(silent, mqtt5.PublishPacket)
        refused = await peer.read()
        assert isinstance(refused, mqtt5.PublishPacket) and refused.packet_id is not None
        await peer.send(
            mqtt5.PubAckPacket(
                refused.packet_id, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED
            ).write()
        )
        fine = await peer.read()
        assert isinstance(fine, mqtt5.PublishPacket) and fine.packet_id is not None
        assert fine.packet_id != silent.packet_id  # still the broker's: not reused
        assert fine.message_expiry_interval == 30 and fine.retain
        await peer.send(mqtt5.PubAckPacket(fine.packet_id).write())
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url, timeout=0.3)
        await transport.start()
        try:
            assert await transport.wait_connected(5)
            with pytest.raises(TransportUnavailable, match="no PUBACK within"):
                await transport.publish("t/silent", b"m")
            with pytest.raises(TransportUnavailable, match="NOT_AUTHORIZED"):
                await transport.publish("t/refused", b"m")
            await transport.publish("t/fine", b"m", expiry=30, retain=True)
            assert transport.connected  # none of it is a reason to reconnect
        finally:
            await transport.close()


async def test_keepalive_pings_an_idle_link_and_drops_a_silent_broker() -> None:
    answered: list[float] = []
    unanswered: list[float] = []
    loop = asyncio.get_running_loop()

    async def script(peer: _Peer) -> None:
        connect = await peer.connack()
        assert connect.keep_alive == 1
        first = len(broker.peers) == 1
        while True:
            packet = await peer.read(timeout=30)
            assert isinstance(packet, mqtt5.PingReqPacket)
            if first and len(answered) < 2:
                answered.append(loop.time())
                await peer.send(mqtt5.PingRespPacket().write())
            elif first:
                unanswered.append(loop.time())  # the broker has gone quiet

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url, keepalive=1)
        await transport.start()
        try:
            await broker.wait_peers(2, timeout=10)
            reconnected = loop.time()
            assert len(answered) == 2  # answered pings kept the first link up
            assert answered[1] - answered[0] >= 0.4  # an idle link pings, not a busy loop
            assert len(unanswered) == 1  # one ping, then a keepalive's wait, then gone
            assert 0.9 <= reconnected - unanswered[0] < 3.0
            assert "PINGREQ" in (transport.last_error or "")
        finally:
            await transport.close()


async def test_the_broker_refusing_the_connection_is_reported() -> None:
    async def script(peer: _Peer) -> None:
        await peer.connack(reason_code=mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url)
        await transport.start()
        try:
            await broker.wait_peers(2)
            assert not transport.connected
            assert "BAD_USER_NAME_OR_PASSWORD" in (transport.last_error or "")
        finally:
            await transport.close()


async def test_a_full_incoming_queue_stops_reading_until_it_is_drained() -> None:
    sent = asyncio.Event()

    async def script(peer: _Peer) -> None:
        await peer.connack()
        for i in range(50):
            await peer.send(mqtt5.PublishPacket(f"t/{i}", b"m" * 1000).write())
        sent.set()
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url, max_queued_incoming=5)
        await transport.start()
        try:
            await asyncio.wait_for(sent.wait(), 5)
            await asyncio.sleep(0.1)
            assert transport._queue.qsize() < 50  # the rest waits in the socket
            received = await _take(transport.messages(), 50)
            assert [m.topic for m in received] == [f"t/{i}" for i in range(50)]
        finally:
            await transport.close()


@pytest.mark.broker
async def test_hundreds_of_publishes_at_once_through_mosquitto_all_arrive(
    mosquitto: MosquittoProcess,
) -> None:
    """Mosquitto lets 20 QoS 1 messages be in flight per client; a batch of 500 replies
    waits its turn and every one arrives, each once."""
    address = parse_broker_url(mosquitto.url)
    publisher = MqttTransport(address, "t-many-pub")
    subscriber = MqttTransport(address, "t-many-sub")
    await subscriber.subscribe("many/#")
    await publisher.start()
    await subscriber.start()
    try:
        assert await publisher.wait_connected(5) and await subscriber.wait_connected(5)
        await asyncio.gather(*(publisher.publish(f"many/{i}", b"%d" % i) for i in range(500)))
        received = await _take(subscriber.messages(), 500)
        assert sorted(int(m.payload) for m in received) == list(range(500))
    finally:
        await publisher.close()
        await subscriber.close()


@pytest.mark.broker
async def test_a_persistent_session_gets_what_was_published_while_it_was_away(
    mosquitto: MosquittoProcess,
) -> None:
    address = parse_broker_url(mosquitto.url)
    publisher = MqttTransport(address, "t-away-pub")
    first = MqttTransport(address, "t-away-sub", persistent=True)
    await first.subscribe("away/#")
    await first.start()
    await publisher.start()
    try:
        assert await first.wait_connected(5) and await publisher.wait_connected(5)
        await first.close()
        for i in range(3):
            await publisher.publish(f"away/{i}", b"queued")
        again = MqttTransport(address, "t-away-sub", persistent=True)
        await again.start()  # no subscribe: the broker kept the subscription
        try:
            received = await _take(again.messages(), 3)
            assert sorted(m.topic for m in received) == ["away/0", "away/1", "away/2"]
        finally:
            await again.close()
    finally:
        await publisher.close()
        await first.close()


@pytest.mark.broker
def test_the_transport_runs_on_uvloop(mosquitto: MosquittoProcess) -> None:
    """The service and the benchmarks' gates run on uvloop, whose transports are not
    asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[int]:
        address = parse_broker_url(mosquitto.url)
        publisher = MqttTransport(address, "t-uv-pub")
        subscriber = MqttTransport(address, "t-uv-sub")
        await subscriber.subscribe("uv/#")
        await publisher.start()
        await subscriber.start()
        try:
            assert await publisher.wait_connected(5) and await subscriber.wait_connected(5)
            await asyncio.gather(*(publisher.publish(f"uv/{i}", b"%d" % i) for i in range(100)))
            return sorted(int(m.payload) for m in await _take(subscriber.messages(), 100))
        finally:
            await publisher.close()
            await subscriber.close()

    assert uvloop.run(main()) == list(range(100))


async def test_a_publish_that_timed_out_waiting_its_turn_is_never_sent() -> None:
    sent: list[str] = []
    acked = asyncio.Event()

    async def script(peer: _Peer) -> None:
        await peer.connack(receive_max=1)
        first = await peer.read()
        assert isinstance(first, mqtt5.PublishPacket) and first.packet_id is not None
        sent.append(first.topic)
        await acked.wait()  # both publishes have timed out by now
        await peer.send(mqtt5.PubAckPacket(first.packet_id).write())
        with contextlib.suppress(TimeoutError):
            late = await peer.read(timeout=0.3)
            sent.append(getattr(late, "topic", type(late).__name__))
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url, timeout=0.2)
        await transport.start()
        try:
            assert await transport.wait_connected(5)
            offline = MqttTransport(parse_broker_url(broker.url), "t-never-started")
            with pytest.raises(TransportUnavailable, match="not connected"):
                await offline.publish_nowait("t/x", b"m")
            results = await asyncio.gather(
                transport.publish_nowait("t/first", b"m"),
                transport.publish_nowait("t/second", b"m"),
                return_exceptions=True,
            )
            assert all(isinstance(r, TransportUnavailable) for r in results)
            acked.set()
            await asyncio.sleep(0.5)
            assert sent == ["t/first"]  # the second gave up before there was room
            await transport.publish("t/third", b"m", qos=0)  # the link is still fine
        finally:
            await transport.close()


async def test_a_link_that_hangs_while_this_side_keeps_publishing_is_dropped() -> None:
    """Nothing comes back (no PUBACK, no PINGRESP) while the client keeps sending: the
    keepalive must still find the link dead, not only an idle one."""
    loop = asyncio.get_running_loop()
    hung_at: list[float] = []

    async def script(peer: _Peer) -> None:
        await peer.connack()
        if len(broker.peers) == 1:
            hung_at.append(loop.time())
            while True:  # swallow everything, answer nothing
                await peer.read(timeout=30)
        await peer.read(timeout=30)

    async with _ScriptedBroker(script) as broker:
        transport = _transport(broker.url, keepalive=1)
        await transport.start()
        try:
            assert await transport.wait_connected(5)

            async def chatter() -> None:
                while True:
                    with contextlib.suppress(TransportUnavailable):
                        await transport.publish("t/status", b"alive", qos=0)
                    await asyncio.sleep(0.05)

            talking = asyncio.create_task(chatter())
            try:
                await broker.wait_peers(2, timeout=10)
            finally:
                talking.cancel()
            assert loop.time() - hung_at[0] < 3.0  # within a keepalive and a half, or so
            assert "PINGREQ" in (transport.last_error or "")
        finally:
            await transport.close()
