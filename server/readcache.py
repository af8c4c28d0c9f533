"""Short-lived caches for the reads the panel polls and for API-token lookups.

The operator panel and dashboards poll a lot's occupancy and its gates' status every few
seconds, from many screens at once; the answer changes only when an event, a status or an
operator's write lands. Each process therefore keeps:

* :class:`ReadCache` — the serialised JSON of a read, per key, fresh for ``ttl`` seconds
  from the start of its load. This process invalidates a lot's entries when its MQTT bridge
  commits something for that lot and drops everything after any state-changing API
  request, so what it wrote itself is seen at once (a dropped entry is never answered
  again, nor is a load that began before the drop). An entry that merely expired is
  answered once more, at once, while exactly one background refresh loads it
  (stale-while-revalidate: no poll waits on an expiry); so a write by *another* service
  process is seen within ``ttl`` plus one load while the read is polled, and no answer
  comes from a load that began more than ``ttl + max_stale`` (by default ``3 * ttl``)
  ago — past that a read waits for a load. A failed refresh is logged and retried after
  ``ttl``; meanwhile the entry is still answered, within the same bound.
* :class:`TokenCache` — who an API token's hash belongs to, for ``ttl`` seconds. A token
  revoked in this process stops working at once; in another process within ``ttl``.

A load that started before an invalidation never stores its (possibly stale) result: each
entry is stored under the generation it was loaded in. Concurrent misses share one load.
:class:`ReadCache` reads (``get``, ``peek``) run on the event loop; ``invalidate`` and
``clear``, like :class:`TokenCache`, may also be called from threadpool workers (dict
operations under the GIL; a lost race costs one extra load, never a stale answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CachedReads", "CachedToken", "ForgetOnWrite", "ReadCache", "TokenCache"]

_MAX_ENTRIES = 10_000

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    fresh_until: float  # answered as is until then (its load began ``ttl`` before)
    stale_until: float  # then answered while one refresh loads it, until this
    body: bytes
    load: Callable[[], Awaitable[bytes]]  # how to refresh it (the route's loader)
    retry_at: float = 0.0  # after a failed refresh: no other one before this


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future[bytes]
    stamp: tuple[int, int]
    started: float


class ReadCache:
    """``await cache.get(key, scope, load)`` -> bytes, loading at most once per ``ttl``.

    An entry is fresh for ``ttl`` seconds from the start of its load. For ``max_stale``
    seconds more (default ``2 * ttl``) it is still answered at once, while exactly one
    background refresh loads it anew (stale-while-revalidate): a poll never waits on an
    expiry. Past that bound, or once :meth:`invalidate` / :meth:`clear` dropped it, a read
    waits for a load like any miss.
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_stale: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_stale = 2 * ttl if max_stale is None else max_stale
        self._clock = clock
        self._entries: dict[tuple[str, Hashable], _Entry] = {}
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._inflight: dict[tuple[str, Hashable], _Flight] = {}
        self._refreshing: set[asyncio.Task[None]] = set()
        self.hits = 0
        """Reads answered from an entry (fresh or stale) without waiting."""
        self.stale_hits = 0
        """Of those, the ones answered from an expired entry while it was refreshed."""
        self.waits = 0
        """Reads that waited on a load another read had started."""
        self.loads = 0
        self.refreshes = 0
        """Background refreshes started."""
        self.refresh_failures = 0

    def _stamp(self, scope: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(scope, 0)

    async def get(self, key: Hashable, scope: str, load: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached bytes for ``key`` (in ``scope``, e.g. a lot id), or ``await load()``.

        Concurrent misses of one key share one load (no stampede under 50 polling
        connections); a failed load is not cached and fails them all.
        """
        if self.ttl <= 0:
            self.loads += 1
            return await load()
        entry = (scope, key)
        body = self._answer(entry, load)
        if body is not None:
            return body
        flight = self._inflight.get(entry)
        if flight is not None:
            self.waits += 1
            return await asyncio.shield(flight.future)
        return await self._load(entry, self._begin(entry), load)

    def peek(self, key: Hashable, scope: str) -> bytes | None:
        """The cached bytes if fresh, or stale within ``max_stale`` (then one background
        refresh starts, with the loader the entry was loaded with); never waits."""
        return self._answer((scope, key), None)

    def _answer(
        self, entry: tuple[str, Hashable], load: Callable[[], Awaitable[bytes]] | None
    ) -> bytes | None:
        found = self._entries.get(entry)
        if found is None:
            return None
        now = self._clock()
        if found.fresh_until > now:
            self.hits += 1
            return found.body
        if found.stale_until <= now:
            return None
        if entry not in self._inflight and found.retry_at <= now:
            self._refresh(entry, found, found.load if load is None else load)
        self.hits += 1
        self.stale_hits += 1
        return found.body

    def _begin(self, entry: tuple[str, Hashable]) -> _Flight:
        """Register a load of ``entry`` (synchronously: no second one can start meanwhile)."""
        flight = _Flight(
            asyncio.get_running_loop().create_future(), self._stamp(entry[0]), self._clock()
        )
        self._inflight[entry] = flight
        return flight

    async def _load(
        self, entry: tuple[str, Hashable], flight: _Flight, load: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        pending = flight.future
        try:
            value = await load()
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            pending.set_result(value)
        finally:
            if self._inflight.get(entry) is flight:
                self._inflight.pop(entry, None)
        self.loads += 1
        if self._stamp(entry[0]) == flight.stamp:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            fresh_until = flight.started + self.ttl
            self._entries[entry] = _Entry(fresh_until, fresh_until + self.max_stale, value, load)
        return value

    def _refresh(
        self, entry: tuple[str, Hashable], found: _Entry, load: Callable[[], Awaitable[bytes]]
    ) -> None:
        flight = self._begin(entry)
        self.refreshes += 1
        task = asyncio.get_running_loop().create_task(self._background(entry, found, flight, load))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _background(
        self,
        entry: tuple[str, Hashable],
        found: _Entry,
        flight: _Flight,
        load: Callable[[], Awaitable[bytes]],
    ) -> None:
        try:
            await self._load(entry, flight, load)
        except Exception:
            self.refresh_failures += 1
            found.retry_at = self._clock() + self.ttl
            log.warning(
                "refreshing the cached read %r of %r failed; its last answer is served"
                " until %.1f s after it expired",
                entry[1],
                entry[0],
                self.max_stale,
                exc_info=True,
            )

    def invalidate(self, scope: str) -> None:
        """Forget every entry of ``scope`` (a lot changed): the next read loads anew,
        never answered from an older entry nor from a load that began before this."""
        self._generation[scope] = self._generation.get(scope, 0) + 1
        for entries in (self._entries, self._inflight):
            for entry in list(entries):  # a copy taken in one step: safe from a thread
                if entry[0] == scope:
                    entries.pop(entry, None)

    def clear(self) -> None:
        """Forget everything (after a state-changing request), in-flight loads included."""
        self._epoch += 1
        self._entries.clear()
        self._inflight.clear()


@dataclass(frozen=True, slots=True)
class CachedToken:
    token_id: str
    name: str
    role: str


class TokenCache:
    """Live API tokens by secret hash, for ``ttl`` seconds (misses are never cached)."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, CachedToken]] = {}
        self._epoch = 0
        self.loading: dict[str, tuple[asyncio.Future[CachedToken | None], int]] = {}
        """Lookups under way by hash, with the epoch each began in (the event loop's; see
        ``server.auth.api``)."""

    def get(self, token_hash: str) -> CachedToken | None:
        found = self._entries.get(token_hash)
        if found is None or found[0] <= self._clock():
            return None
        return found[1]

    def epoch(self) -> int:
        return self._epoch

    def put(self, token_hash: str, token: CachedToken, *, epoch: int) -> None:
        """Remember ``token`` unless the cache was cleared since ``epoch`` (a revocation)."""
        if self.ttl <= 0 or epoch != self._epoch:
            return
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[token_hash] = (self._clock() + self.ttl, token)

    def clear(self) -> None:
        self._epoch += 1
        self._entries.clear()
        # A lookup under way began before this clear: the epoch it began in keeps the
        # requests waiting for it from taking its answer (``server.auth.api``).


class ForgetOnWrite:
    """ASGI middleware: after any state-changing HTTP request, drop this process's cached
    reads and token lookups (the write is committed by the time the route returned)."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, forget: Callable[[], None]) -> None:
        self.app = app
        self.forget = forget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in self.SAFE:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.forget()


_POLLED = re.compile(r"^/api/v1/lots/(?P<lot>[^/]{1,64})(?P<gates>/gates)?$")


class CachedReads:
    """ASGI middleware: answer a polled read straight from the cache when it can.

    A ``GET /api/v1/lots/{lot}`` or ``GET /api/v1/lots/{lot}/gates`` with a bearer token
    that the token cache knows (any role may read) and a cached body (fresh, or expired
    within ``max_stale`` while one refresh runs: :meth:`ReadCache.peek`) is answered
    here, without routing, dependency resolution or a thread hop — what lets one worker
    serve thousands of dashboard polls a second. Everything else — a miss, a cookie, an
    unknown token, any other path — goes to the app, which loads and fills the caches
    with the same rules (``server/lots/router.py``, ``server/gateways/router.py``).
    """

    def __init__(
        self, app: ASGIApp, caches: Callable[[], tuple[ReadCache, TokenCache] | None]
    ) -> None:
        self.app = app
        self.caches = caches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            body = self._hit(scope)
            if body is not None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _hit(self, scope: Scope) -> bytes | None:
        matched = _POLLED.match(scope["path"])
        if matched is None:
            return None
        caches = self.caches()
        if caches is None:
            return None
        reads, tokens = caches
        secret = _bearer(scope["headers"])
        if secret is None or tokens.get(hashlib.sha256(secret).hexdigest()) is None:
            return None
        return reads.peek("gates" if matched["gates"] else "lot", matched["lot"])


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, secret = value.partition(b" ")
            return secret.strip() if scheme.lower() == b"bearer" and secret.strip() else None
    return None
