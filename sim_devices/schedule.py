"""Shared timers for a fleet of simulated lanes in one event loop.

A thousand simulated gates each with a camera at 10 fps and a firmware tick at 20 Hz are
30,000 timer wake-ups a second if every one of them sleeps on its own: each an asyncio
``TimerHandle`` pushed onto and popped off the loop's heap (ordered by a Python-level
``__lt__``), then cancelled, then a task step. These two classes put them on a few timers:

* :class:`SharedTimer`: ``await timer.sleep(delay)`` wakes at ``delay`` rounded *up* to the
  timer's ``resolution`` (5 ms by default); every sleeper due in the same slot shares one
  loop timer. The simulated cameras pace their frames with it (the ``timer`` of
  :class:`~sim_devices.camera.SimCamera`): each still delivers one frame per interval, a
  few milliseconds late at most.
* :class:`Ticker`: ``every(period, callback)`` calls every callback of the same period from
  one periodic timer, one after another, with no task switch between them. It is a
  :class:`~gateway_firmware.app.TickSource`: a gateway built with ``ticks=ticker`` runs its
  own :meth:`~gateway_firmware.app.Gateway.tick` (the same code its own tick loop runs) from
  it instead of from a loop of its own.

>>> import asyncio
>>> async def demo() -> int:
...     ticker, calls = Ticker(), []
...     stop = ticker.every(0.01, lambda: calls.append(1))
...     await SharedTimer().sleep(0.035)
...     stop()
...     return len(calls)
>>> 2 <= asyncio.run(demo()) <= 4
True
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

__all__ = ["SharedTimer", "Ticker"]

log = logging.getLogger(__name__)


class SharedTimer:
    """Sleeps rounded up to ``resolution`` seconds, every slot one loop timer."""

    def __init__(self, resolution: float = 0.005) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[int, list[asyncio.Future[None]]] = {}
        self.wakeups = 0  # loop timers fired (for tests and reports)

    async def sleep(self, delay: float) -> None:
        """Sleep at least ``delay`` seconds (at most ``resolution`` more); ``<= 0`` yields once."""
        if delay <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (a test's asyncio.run)
            self._loop, self._slots = loop, {}
        slot = math.ceil((loop.time() + delay) / self.resolution)
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            loop.call_at(slot * self.resolution, self._fire, slot)
        future: asyncio.Future[None] = loop.create_future()
        waiters.append(future)
        await future  # a cancelled sleeper cancels only its own future

    def _fire(self, slot: int) -> None:
        self.wakeups += 1
        for future in self._slots.pop(slot, ()):
            if not future.done():
                future.set_result(None)


class Ticker:
    """Periodic callbacks, all those of one period from one timer (a gateway fleet's ticks).

    A callback that raises is logged and keeps being called (one gate's fault does not stop
    the others' ticks). Rounds keep to their schedule; after a late one (a busy loop) the
    next may come at once, but missed rounds are not made up for in a burst.
    """

    def __init__(self) -> None:
        self._rounds: dict[float, _Round] = {}

    def every(self, period: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` every ``period`` seconds from the running loop, the first time
        one period from now (or sooner, with the round already running); returns the
        function that stops it."""
        if period <= 0:
            raise ValueError("period must be positive")
        loop = asyncio.get_running_loop()
        round_ = self._rounds.get(period)
        if round_ is None or round_.loop is not loop:
            round_ = self._rounds[period] = _Round(loop, period)
        key = object()
        round_.callbacks[key] = callback
        round_.ensure_scheduled()

        def stop() -> None:
            round_.callbacks.pop(key, None)

        return stop

    @property
    def callbacks(self) -> int:
        """How many callbacks are registered (for tests and reports)."""
        return sum(len(round_.callbacks) for round_ in self._rounds.values())


class _Round:
    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.callbacks: dict[object, Callable[[], None]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def ensure_scheduled(self) -> None:
        if self._handle is None:
            self._due = self.loop.time() + self.period
            self._handle = self.loop.call_at(self._due, self._run)

    def _run(self) -> None:
        self._handle = None
        for callback in list(self.callbacks.values()):
            try:
                callback()
            except Exception:
                log.exception("a tick callback failed")
        if not self.callbacks:
            return  # idle until the next every()
        now = self.loop.time()
        self._due = max(self._due + self.period, now)
        self._handle = self.loop.call_at(self._due, self._run)
