"""Network fault injection: a small TCP proxy that can be severed, stalled, slowed and cut.

Put one between a gateway and the broker (the gateway's ``broker_url`` is the proxy's
:attr:`TcpProxy.url`) and cut that gateway off without touching the broker or the other
clients::

    proxy = await TcpProxy("127.0.0.1", broker.port).start()
    ...                       # gateway connects to proxy.url
    await proxy.sever()       # connections reset, port closed: the gateway is offline
    await proxy.heal()        # accepts again; the gateway reconnects and replays its outbox
    proxy.stall()             # connections stay up but nothing moves (a silent partition)
    proxy.unstall()           # the held bytes flow again, late
    proxy.set_latency(up=0.2, down=0.05)   # every byte arrives that much later
    proxy.cut_after(100, direction="up")   # 100 more bytes go through, then a reset
    await proxy.heal()        # every fault off: no latency, no cut armed, accepting
    await proxy.close()

``sever`` is a loud failure (the client sees the reset at once); ``stall`` is a quiet one
(the client only notices through its keepalive, or never, if the stall is short); latency
is a slow cellular link; ``cut_after`` breaks a connection in the middle of whatever is
being sent (half an MQTT packet, say): all happen at real lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Flow", "ProxyStats", "TcpProxy"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_QUEUED_CHUNKS = 64  # per direction: beyond that the reader waits (back-pressure)
_FLUSH_TIMEOUT_S = 2.0

Flow = Literal["up", "down"]
"""``"up"``: client -> target; ``"down"``: target -> client."""

_FLOWS: tuple[Flow, ...] = ("up", "down")


@dataclass
class ProxyStats:
    connections: int = 0  # accepted and forwarded
    refused: int = 0  # accepted while severed (or target unreachable), closed at once
    severed: int = 0  # live connections reset by sever()
    cut: int = 0  # live connections reset by a cut_after() rule
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    # Event-loop time of every accepted connection, forwarded or refused: when clients
    # (re)connect, e.g. how a fleet's reconnects spread out after an outage.
    accepted_at: list[float] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """Connections clients opened to the proxy (forwarded + refused)."""
        return self.connections + self.refused


@dataclass
class _CutRule:
    nbytes: int
    flow: Flow
    repeat: bool


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Bytes this connection may still forward in a direction before a cut (None: no limit).
    budget: dict[Flow, int | None] = field(default_factory=lambda: {"up": None, "down": None})

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
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
        self._latency: dict[Flow, float] = {"up": 0.0, "down": 0.0}
        self._cut: _CutRule | None = None

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

    @property
    def latency(self) -> dict[Flow, float]:
        """The added delay per direction, in seconds."""
        return dict(self._latency)

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
        """Every fault off: accept and forward again, stalled bytes flow, no added latency,
        no cut armed."""
        self._up = True
        self._flowing.set()
        self.set_latency()
        self._disarm_cut()
        if self._server is None:
            await self._listen()
        log.info("%s healed", self.name)

    def stall(self) -> None:
        """Keep connections open but hold every byte (a silent partition)."""
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def set_latency(self, *, up: float = 0.0, down: float = 0.0) -> None:
        """Deliver every byte ``up`` s late towards the target and ``down`` s late back.

        A delay, not a bandwidth limit: bytes read ``d`` apart arrive ``d`` apart, in order.
        It applies to bytes read from now on (those already on their way keep theirs), on
        live and new connections alike; ``set_latency()`` switches it off.
        """
        if up < 0 or down < 0:
            raise ValueError("latency cannot be negative")
        self._latency = {"up": up, "down": down}
        log.info("%s latency up %.3fs, down %.3fs", self.name, up, down)

    def cut_after(self, nbytes: int, *, direction: Flow = "up", repeat: bool = False) -> None:
        """Forward ``nbytes`` more bytes in ``direction``, then reset that connection.

        The byte stream is truncated exactly there (mid-packet, if that is where it falls),
        then both sides are reset. Counted per connection: from now on for live ones, from
        their first byte for new ones. ``repeat=False``: the first connection to get there
        is cut and the rule is spent; ``repeat=True``: every connection is, until
        :meth:`heal` (a link that always dies after so many bytes).
        """
        if nbytes < 0:
            raise ValueError("nbytes cannot be negative")
        if direction not in _FLOWS:
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        self._disarm_cut()
        self._cut = _CutRule(nbytes, direction, repeat)
        for pair in self._pairs:
            pair.budget[direction] = nbytes
        log.info("%s: cut after %d bytes %s (repeat=%s)", self.name, nbytes, direction, repeat)

    @property
    def cut_armed(self) -> bool:
        return self._cut is not None

    def _disarm_cut(self) -> None:
        self._cut = None
        for pair in self._pairs:
            pair.budget = {"up": None, "down": None}

    # -- forwarding -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted_at.append(asyncio.get_running_loop().time())
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
        if self._cut is not None:
            pair.budget[self._cut.flow] = self._cut.nbytes
        self._pairs.add(pair)
        self.stats.connections += 1
        queues: dict[Flow, asyncio.Queue[tuple[float, bytes] | None]] = {
            flow: asyncio.Queue(_QUEUED_CHUNKS) for flow in _FLOWS
        }
        pair.tasks = [
            asyncio.create_task(self._read(reader, queues["up"], "up")),
            asyncio.create_task(self._deliver(queues["up"], up_writer, pair, "up")),
            asyncio.create_task(self._read(up_reader, queues["down"], "down")),
            asyncio.create_task(self._deliver(queues["down"], writer, pair, "down")),
        ]

    async def _read(
        self,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        flow: Flow,
    ) -> None:
        """Read one side and queue each chunk with the time it is due at the other side."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(_CHUNK):
                await queue.put((loop.time() + self._latency[flow], data))
        await queue.put(None)  # end of stream: the writer ends the connection

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        sink: asyncio.StreamWriter,
        pair: _Pair,
        flow: Flow,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if pair not in self._pairs:
                    return
                budget = pair.budget[flow]
                cut = budget is not None and len(data) >= budget
                if budget is not None:
                    data = data[:budget]
                    pair.budget[flow] = budget - len(data)
                if data:
                    sink.write(data)
                    await sink.drain()
                    if flow == "up":
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                if cut:
                    await self._cut_pair(pair, sink)
                    return
        except OSError:
            pass
        finally:
            # One side ended: end the other too (MQTT has no half-open use).
            if pair in self._pairs:
                self._pairs.discard(pair)
                for writer in (pair.client, pair.upstream):
                    with contextlib.suppress(Exception):
                        writer.close()
                current = asyncio.current_task()
                for task in pair.tasks:
                    if task is not current:
                        task.cancel()

    async def _cut_pair(self, pair: _Pair, sink: asyncio.StreamWriter) -> None:
        """Reset ``pair`` once the truncated bytes have reached the kernel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_TIMEOUT_S
        while sink.transport.get_write_buffer_size() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        self._pairs.discard(pair)
        pair.abort()
        self.stats.cut += 1
        rule = self._cut
        if rule is not None and not rule.repeat:
            self._disarm_cut()
        log.info("%s: connection cut after its byte budget", self.name)
