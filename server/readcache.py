"""Short-lived caches for the reads the panel polls and for API-token lookups.

The operator panel and dashboards poll a lot's occupancy and its gates' status every few
seconds, from many screens at once; the answer changes only when an event, a status or an
operator's write lands. Each process therefore keeps:

* :class:`ReadCache` — the serialised JSON of a read, per key, for ``ttl`` seconds. This
  process invalidates a lot's entries when its MQTT bridge commits something for that lot
  and drops everything after any state-changing API request, so what it wrote itself is
  seen at once; a write by *another* service process is seen within ``ttl``.
* :class:`TokenCache` — who an API token's hash belongs to, for ``ttl`` seconds. A token
  revoked in this process stops working at once; in another process within ``ttl``.

A load that started before an invalidation never stores its (possibly stale) result: each
entry is stored under the generation it was loaded in. Both are safe to use from the event
loop and from threadpool workers (dict operations under the GIL; a lost race costs one
extra load, never a stale answer past ``ttl``). Concurrent misses share one load.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CachedReads", "CachedToken", "ForgetOnWrite", "ReadCache", "TokenCache"]

_MAX_ENTRIES = 10_000


class ReadCache:
    """``await cache.get(key, scope, load)`` -> bytes, loading at most once per ``ttl``."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, Hashable], tuple[float, bytes]] = {}
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._inflight: dict[tuple[str, Hashable], asyncio.Future[bytes]] = {}
        self.hits = 0
        self.loads = 0

    def _stamp(self, scope: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(scope, 0)

    async def get(self, key: Hashable, scope: str, load: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached bytes for ``key`` (in ``scope``, e.g. a lot id), or ``await load()``.

        Concurrent misses of one key share one load (no stampede when an entry expires
        under 50 polling connections); a failed load is not cached and fails them all.
        """
        if self.ttl <= 0:
            self.loads += 1
            return await load()
        entry = (scope, key)
        found = self._entries.get(entry)
        if found is not None and found[0] > self._clock():
            self.hits += 1
            return found[1]
        pending = self._inflight.get(entry)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._inflight[entry] = pending
        stamp = self._stamp(scope)
        try:
            value = await load()
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            pending.set_result(value)
        finally:
            self._inflight.pop(entry, None)
        self.loads += 1
        if self._stamp(scope) == stamp:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[entry] = (self._clock() + self.ttl, value)
        return value

    def peek(self, key: Hashable, scope: str) -> bytes | None:
        """The cached bytes if present and fresh; never loads."""
        found = self._entries.get((scope, key))
        if found is None or found[0] <= self._clock():
            return None
        self.hits += 1
        return found[1]

    def invalidate(self, scope: str) -> None:
        """Forget every entry of ``scope`` (a lot changed)."""
        self._generation[scope] = self._generation.get(scope, 0) + 1
        for entry in [k for k in self._entries if k[0] == scope]:
            self._entries.pop(entry, None)

    def clear(self) -> None:
        """Forget everything (after a state-changing request)."""
        self._epoch += 1
        self._entries.clear()


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
    that the token cache knows (any role may read) and a fresh cached body is answered
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
