"""The fault-injection proxy: forwards, severs (loud), stalls (quiet), delays, cuts after N
bytes, and heals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from qrpark.services import free_port
from sim_devices.netfault import TcpProxy


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def roundtrip(port: int, data: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), 2)
    finally:
        writer.close()


async def test_proxy_forwards_both_ways(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        assert await roundtrip(proxy.port, b"hello") == b"hello"
        assert proxy.url == f"mqtt://127.0.0.1:{proxy.port}"
        assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (5, 5)


async def test_sever_resets_live_connections_and_refuses_new_ones_until_healed(
    echo_port: int,
) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        assert await proxy.sever() == 1
        assert await asyncio.wait_for(reader.read(), 2) == b""  # the client sees it at once
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await roundtrip(proxy.port)
        assert not proxy.is_up
        await proxy.heal()
        assert await roundtrip(proxy.port) == b"ping"


async def test_stall_holds_bytes_until_unstalled(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.stall()
        writer.write(b"late")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.2)
        assert proxy.live_connections == 1  # the connection itself looks fine
        proxy.unstall()
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"late"
        writer.close()


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[int, list[bytearray]]]:
    """A target that echoes and keeps what each connection sent it (one buffer each)."""
    received: list[bytearray] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        received.append(got)
        try:
            while data := await reader.read(1024):
                got += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    """Everything the peer sent until it closed or reset the connection."""
    got = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while data := await reader.read(1024):
                got += data
        except ConnectionError:
            pass
    return bytes(got)


async def timed_roundtrip(port: int, data: bytes = b"ping") -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await roundtrip(port, data) == data
    return loop.time() - started


async def test_latency_delays_each_direction_by_its_own_amount(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        assert await timed_roundtrip(proxy.port) < 0.1
        proxy.set_latency(up=0.15)
        assert 0.15 <= await timed_roundtrip(proxy.port) < 0.6
        proxy.set_latency(down=0.25)
        assert 0.25 <= await timed_roundtrip(proxy.port) < 0.7
        proxy.set_latency(up=0.1, down=0.2)
        assert proxy.latency == {"up": 0.1, "down": 0.2}
        assert 0.3 <= await timed_roundtrip(proxy.port) < 0.8
        proxy.set_latency()
        assert await timed_roundtrip(proxy.port) < 0.1
        with pytest.raises(ValueError, match="negative"):
            proxy.set_latency(up=-1)


async def test_latency_is_a_delay_not_a_bandwidth_limit(echo_port: int) -> None:
    """Five writes 0.1 s apart through 0.5 s of latency: all back after ~0.9 s, in order
    (a proxy that slept per chunk would take 2.5 s)."""
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        proxy.set_latency(up=0.5)
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = loop.time()
        for i in range(5):
            writer.write(str(i).encode())
            await writer.drain()
            await asyncio.sleep(0.1)
        first = await asyncio.wait_for(reader.readexactly(1), 3)
        first_at = loop.time() - started
        rest = await asyncio.wait_for(reader.readexactly(4), 3)
        done_at = loop.time() - started
        writer.close()
        assert first + rest == b"01234"
        assert 0.5 <= first_at < 1.0
        assert 0.9 <= done_at < 1.6


async def test_latency_applies_to_a_live_connection_and_keeps_stalls(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), 2) == b"a"
        proxy.set_latency(down=0.3)
        proxy.stall()
        writer.write(b"b")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.5)  # stalled, not only late
        proxy.unstall()
        assert await asyncio.wait_for(reader.readexactly(1), 2) == b"b"
        writer.close()


async def test_cut_after_n_bytes_up_truncates_mid_write_and_resets(
    recorder: tuple[int, list[bytearray]],
) -> None:
    port, received = recorder
    async with TcpProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"abc")
        assert await asyncio.wait_for(reader.readexactly(3), 2) == b"abc"
        proxy.cut_after(10, direction="up")  # counted from now on this live connection
        assert proxy.cut_armed
        writer.write(b"0123456")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"789ABCDEF")  # the cut falls inside this write
        echoed = await read_until_closed(reader)
        writer.close()
        assert bytes(received[0]) == b"abc0123456789"  # exactly 10 bytes after arming
        assert b"0123456789".startswith(echoed)  # whatever came back before the reset
        assert proxy.stats.cut == 1
        assert proxy.stats.bytes_up == 13
        assert proxy.live_connections == 0
        # One-shot: spent on that connection; the next one is forwarded whole.
        assert not proxy.cut_armed
        assert await roundtrip(proxy.port, b"0123456789ABCDEF") == b"0123456789ABCDEF"
        assert bytes(received[1]) == b"0123456789ABCDEF"


async def test_cut_after_n_bytes_down_delivers_exactly_that_many(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        proxy.cut_after(5, direction="down")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello world")
        await writer.drain()
        assert await read_until_closed(reader) == b"hello"
        writer.close()
        assert (proxy.stats.cut, proxy.stats.bytes_down) == (1, 5)


async def test_repeating_cut_breaks_every_connection_until_healed(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        proxy.cut_after(4, direction="down", repeat=True)
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"abcdefgh")
            await writer.drain()
            assert await read_until_closed(reader) == b"abcd"
            writer.close()
        assert proxy.stats.cut == 3
        assert proxy.cut_armed
        await proxy.heal()
        assert not proxy.cut_armed
        assert await roundtrip(proxy.port, b"abcdefgh") == b"abcdefgh"
        assert proxy.stats.attempts == proxy.stats.connections == 4
        assert len(proxy.stats.accepted_at) == 4


async def test_cut_after_zero_bytes_resets_before_anything_passes(
    recorder: tuple[int, list[bytearray]],
) -> None:
    port, received = recorder
    async with TcpProxy("127.0.0.1", port) as proxy:
        proxy.cut_after(0)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        assert await read_until_closed(reader) == b""
        writer.close()
        await asyncio.sleep(0.05)
        assert [bytes(r) for r in received] == [b""]
        with pytest.raises(ValueError, match="direction"):
            proxy.cut_after(1, direction="sideways")  # type: ignore[arg-type]


async def test_attempts_to_an_unreachable_target_are_refused_and_counted() -> None:
    async with TcpProxy("127.0.0.1", free_port()) as proxy:  # nothing listens there
        loop = asyncio.get_running_loop()
        before = loop.time()
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await read_until_closed(reader) == b""
            writer.close()
        assert (proxy.stats.refused, proxy.stats.connections, proxy.stats.attempts) == (2, 0, 2)
        assert all(before <= t <= loop.time() for t in proxy.stats.accepted_at)
        assert len(proxy.stats.accepted_at) == 2
