"""A deterministic, virtual-time asyncio event loop for simulation testing.

The real gateway and central-service code runs on it unchanged:

* time is virtual: when no callback is ready, the loop jumps straight to the next timer, so
  an hour of ``asyncio.sleep`` passes in microseconds;
* ``run_in_executor`` (and so ``asyncio.to_thread``) runs the function inline, on the loop's
  thread, so database work and decoding happen in a reproducible order;
* there is no real IO: the simulated world talks through in-process queues only
  (``parking_protocol.transport.InMemoryBroker``).

Given the same seed for everything random in the world, a run is exactly reproducible.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import selectors
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

__all__ = ["VirtualClock", "VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):
    """Never waits: a select with a timeout advances the loop's virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # The simulated world does no real IO (its only fd is the loop's own wake-up pipe,
        # used by other threads, of which there are none), so there is nothing to poll.
        if self.loop is None:
            return super().select(timeout)
        if timeout is None:
            # Nothing is scheduled at all and no IO is possible: the world is stuck.
            raise RuntimeError("virtual-time loop would wait forever (deadlock in the world)")
        if timeout > 0:
            self.loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._virtual = 0.0
        self.slow_callback_duration = float("inf")

    def time(self) -> float:
        return self._virtual

    def advance(self, seconds: float) -> None:
        self._virtual += seconds

    def run_in_executor(  # type: ignore[override]
        self, executor: concurrent.futures.Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class VirtualClock:
    """A ``Clock`` whose ``now()`` is ``start`` plus the loop's virtual time."""

    def __init__(self, loop: VirtualTimeLoop, start: datetime | None = None) -> None:
        self._loop = loop
        self._start = start or datetime(2026, 1, 1, 8, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._loop.time())


def run_virtual(main: Callable[[VirtualTimeLoop], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop)`` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        context = contextvars.copy_context()
        return context.run(loop.run_until_complete, main(loop))
    finally:
        try:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
