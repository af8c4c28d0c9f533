"""Network fault injection: a small TCP proxy that can be severed, stalled and healed.

Put one between a gateway and the broker (the gateway's ``broker_url`` is the proxy's
:attr:`TcpProxy.url`) and cut that gateway off without touching the broker or the other
clients::

    proxy = await TcpProxy("127.0.0.1", broker.port).start()
    ...                       # gateway connects to proxy.url
    await proxy.sever()       # connections reset, port closed: the gateway is offline
    await proxy.heal()        # accepts again; the gateway reconnects and replays its outbox
    proxy.stall()             # connections stay up but nothing moves (a silent partition)
    proxy.unstall()           # the held bytes flow again, late
    await proxy.close()

``sever`` is a loud failure (the client sees the reset at once); ``stall`` is a quiet one
(the client only notices through its keepalive, or never, if the stall is short): both
happen at real lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

__all__ = ["ProxyStats", "TcpProxy"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    connections: int = 0  # accepted and forwarded
    refused: int = 0  # accepted while severed, closed at once
    severed: int = 0  # live connections reset by sever()
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port`` until told otherwise."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "proxy",
    ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.name = name
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._up = True
        self._flowing = asyncio.Event()
        self._flowing.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> TcpProxy:
        await self._listen()
        assert self._server is not None
        self._listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        await self.sever()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._listen_port

    @property
    def url(self) -> str:
        """The broker URL a client should use to go through this proxy."""
        return f"mqtt://{self.listen_host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def live_connections(self) -> int:
        return len(self._pairs)

    # -- faults -------------------------------------------------------------------------------
    async def sever(self) -> int:
        """Reset every live connection and close the port until :meth:`heal`; returns resets.

        New connections are refused by the kernel (ECONNREFUSED), so a client's reconnect
        attempts fail at once instead of hanging in an MQTT handshake.
        """
        self._up = False
        await self._stop_listening()
        pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            pair.abort()
        self.stats.severed += len(pairs)
        if pairs:
            await asyncio.gather(*(t for p in pairs for t in p.tasks), return_exceptions=True)
        log.info("%s severed (%d connections reset)", self.name, len(pairs))
        return len(pairs)

    async def heal(self) -> None:
        """Accept and forward connections again (and let stalled bytes flow)."""
        self._up = True
        self._flowing.set()
        if self._server is None:
            await self._listen()
        log.info("%s healed", self.name)

    def stall(self) -> None:
        """Keep connections open but hold every byte (a silent partition)."""
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    # -- forwarding -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.info("%s: target %s:%d unreachable: %s", self.name, *self.target, exc)
            self.stats.refused += 1
            writer.transport.abort()
            return
        if not self._up:  # severed while connecting
            up_writer.transport.abort()
            writer.transport.abort()
            self.stats.refused += 1
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        self.stats.connections += 1
        pair.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, pair, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, pair, upstream=False)),
        ]

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: _Pair,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if pair not in self._pairs:
                    return
                sink.write(data)
                await sink.drain()
                if upstream:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (MQTT has no half-open use).
            if pair in self._pairs:
                self._pairs.discard(pair)
                for writer in (pair.client, pair.upstream):
                    with contextlib.suppress(Exception):
                        writer.close()
