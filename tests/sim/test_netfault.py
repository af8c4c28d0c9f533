"""The fault-injection proxy: forwards, severs (loud), stalls (quiet) and heals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

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
