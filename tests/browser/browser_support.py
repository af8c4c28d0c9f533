"""Helpers shared by the browser tests (imported by name; not a conftest)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from parking_protocol.clock import Clock
from server.central import Central
from sim_devices.lot import SimLane
from sim_devices.traffic import Driver, LaneOutcome, Phone, pass_lane

ADMIN_PASSWORD = "browser-admin-pass"
DRIVER_PIN = "1357"
VIEWER_PASSWORD = "viewer-pass-1"
T = TypeVar("T")


def keep(path: Path) -> None:
    """Copy a screenshot to ``QRPARK_SCREENSHOT_DIR`` when set, for people to look at."""
    target = os.environ.get("QRPARK_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` from the test's thread; fail naming ``what`` when it stays false."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class LoopThread:
    """An asyncio loop on its own thread: the service's, or the simulated lot's."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        """Run a coroutine on this loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class LiveService:
    """The running service (uvicorn in a thread, MQTT to a private Mosquitto): its URL,
    the Central and the server's loop."""

    url: str
    central: Central
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@dataclass
class SimLot:
    """Lot ``demo``'s two lanes — the real gateway firmware on simulated camera, barrier,
    loop detector and display — talking to the service through Mosquitto."""

    live: LiveService
    thread: LoopThread
    clock: Clock
    entry: SimLane
    exit: SimLane

    def driver(self, account_id: str, *, registered: bool = True) -> Driver:
        """A driver whose phone fetches fresh codes from the service (``registered=False``:
        a validly signed code for an account the service does not know)."""
        central = self.live.central

        async def source(account: str) -> str:
            issue = central.issue_code if registered else central.sign_code
            return (await asyncio.to_thread(issue, account)).code

        return Driver(account_id, Phone(account_id, source, self.clock))

    def drive(self, lane: SimLane, driver: Driver, timeout: float = 10) -> LaneOutcome:
        """The car pulls up, shows the phone to the camera and waits for the barrier."""
        return self.thread.run(pass_lane(lane.lane, driver, timeout=timeout), timeout + 15)
