"""Login rate limiting, pure: failures per key in a sliding window (the caller gives ``now``).

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

__all__ = ["LoginThrottle"]


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

    def fail(self, keys: Iterable[str], now: datetime) -> None:
        for key in keys:
            self._recent(key, now)
            self._failures.setdefault(key, deque()).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of names
                self._failures.pop(next(iter(self._failures)))

    def succeed(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._failures.pop(key, None)
