"""Debounce: a code held in front of the camera is decoded many times a second; it is one scan.

The same text seen again within ``window`` of the last sighting is the same scan, so a phone
held still for a minute stays one scan; after ``window`` without seeing it, it counts again.

>>> from datetime import UTC, datetime, timedelta
>>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
>>> d = Debouncer(timedelta(seconds=5))
>>> d.accept("QP1.a", t0), d.accept("QP1.a", t0 + timedelta(seconds=3))
(True, False)
>>> d.accept("QP1.a", t0 + timedelta(seconds=9))
True
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta

__all__ = ["Debouncer"]


class Debouncer:
    """Remembers when each recent text was last seen (bounded; pure: takes ``now``)."""

    def __init__(self, window: timedelta, *, max_entries: int = 256) -> None:
        if window <= timedelta(0):
            raise ValueError("the debounce window must be positive")
        self.window = window
        self._max_entries = max_entries
        self._last_seen: OrderedDict[str, datetime] = OrderedDict()

    def accept(self, text: str, now: datetime) -> bool:
        """Record a sighting of ``text``; True when it is a new scan."""
        self._expire(now)
        last = self._last_seen.pop(text, None)
        self._last_seen[text] = now
        if len(self._last_seen) > self._max_entries:
            self._last_seen.popitem(last=False)
        return last is None or now - last >= self.window

    def _expire(self, now: datetime) -> None:
        while self._last_seen:
            text, seen = next(iter(self._last_seen.items()))
            if now - seen < self.window:
                break
            del self._last_seen[text]
