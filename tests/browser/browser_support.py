"""Helpers shared by the browser tests (imported by name; not a conftest)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from parking_protocol.transport import InMemoryBroker
from server.central import Central

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


@dataclass
class LiveService:
    """The running service: its URL, the Central, the broker and the server's loop."""

    url: str
    central: Central
    broker: InMemoryBroker
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the server's loop (where the broker lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
