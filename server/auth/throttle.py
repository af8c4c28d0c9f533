"""Rate limiting, pure (the caller gives ``now``): failed sign-ins per key in a sliding
window, and a token bucket per key for request rates (code issuing).

>>> from datetime import UTC, datetime
>>> t = LoginThrottle(max_failures=2)
>>> now = datetime(2026, 1, 1, tzinfo=UTC)
>>> t.fail(["ip:1"], now); t.fail(["ip:1"], now); t.blocked(["ip:1"], now)
True
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta

__all__ = ["LoginThrottle", "TokenBucket"]


class LoginThrottle:
    """At most ``max_failures`` failed sign-ins per key (user name, client address) per window.

    In memory, per process: good enough to stop password guessing against one service;
    several processes each apply the limit on their own.
    """

    def __init__(self, *, max_failures: int = 5, window: timedelta = timedelta(minutes=15)) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[datetime]] = {}

    def _recent(self, key: str, now: datetime) -> deque[datetime]:
        found = self._failures.get(key)
        if found is None:
            return deque()
        while found and now - found[0] >= self.window:
            found.popleft()
        if not found:
            del self._failures[key]
        return found

    def blocked(self, keys: Iterable[str], now: datetime) -> bool:
        return any(len(self._recent(key, now)) >= self.max_failures for key in keys)

    def retry_after(self, keys: Iterable[str], now: datetime) -> timedelta:
        """How long until none of ``keys`` is blocked any more (zero when none is)."""
        wait = timedelta(0)
        for key in keys:
            recent = self._recent(key, now)
            if len(recent) >= self.max_failures:
                wait = max(wait, recent[-self.max_failures] + self.window - now)
        return wait

    def fail(self, keys: Iterable[str], now: datetime) -> None:
        for key in keys:
            self._recent(key, now)
            self._failures.setdefault(key, deque()).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of names
                self._failures.pop(next(iter(self._failures)))

    def succeed(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._failures.pop(key, None)


class TokenBucket:
    """Per key, ``burst`` requests at once and then ``per_minute`` a minute.

    >>> from datetime import UTC, datetime
    >>> bucket = TokenBucket(per_minute=60, burst=1)
    >>> now = datetime(2026, 1, 1, tzinfo=UTC)
    >>> bucket.take("a", now), bucket.take("a", now), bucket.take("a", now + timedelta(seconds=1))
    (None, 1.0, None)
    """

    def __init__(self, *, per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0  # tokens a second
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, datetime]] = {}

    def take(self, key: str, now: datetime) -> float | None:
        """Take one token: None if allowed, else the seconds until one is available."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        elapsed = max(0.0, (now - at).total_seconds())
        tokens = min(self.burst, tokens + elapsed * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            allowed = True
        else:
            self._buckets[key] = (tokens, now)
            allowed = False
        if len(self._buckets) > self.max_keys:  # drop the least recently used
            self._buckets.pop(next(iter(self._buckets)))
        return None if allowed else (1.0 - tokens) / self.rate
