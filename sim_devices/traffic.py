"""Simulated drivers: phones that refresh their dynamic codes, and traffic through a lot.

Drivers arrive by a Poisson process, hold their phone up at the entry lane, park for a
while, then leave through the exit lane. Everything goes through the real gateways: the
only simulated things are the phone screen (rendered into camera frames), the loop detector
and the barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from gateway_firmware.hardware.interfaces import Gate
from parking_protocol.clock import Clock
from parking_protocol.qr_token import parse_code
from parking_protocol.types import DENY_TEXT, Reason
from sim_devices.scene import LaneScene

__all__ = [
    "REFUSAL_TEXTS",
    "Driver",
    "Lane",
    "LaneOutcome",
    "Phone",
    "TrafficStats",
    "pass_lane",
    "reason_for_text",
    "run_traffic",
]

_OPENING = {Reason.WELCOME, Reason.PAID, Reason.MANUAL_OPEN}
# Display texts that end a driver's attempt with the barrier shut.
REFUSAL_TEXTS: dict[str, Reason] = {
    text: reason for reason, text in DENY_TEXT.items() if reason not in _OPENING
}


def _head(text: str) -> str:
    return text.split(" - ", maxsplit=1)[0].split(":", maxsplit=1)[0].strip().lower()


_REFUSAL_HEADS = {_head(text): reason for text, reason in REFUSAL_TEXTS.items()}
# Texts the lane shows while it is still working on a code: not an answer.
_PENDING_TEXTS = {"Checking...", "Show your parking code"}


def reason_for_text(text: str | None) -> str:
    """The reason behind a gate display text (``"no_answer"`` when there was none).

    Matches the service's texts by their first words too, so ``"Insufficient balance:
    ¥15.00 due - top up in the app"`` is ``insufficient_balance``.
    """
    if text is None:
        return "no_answer"
    reason = REFUSAL_TEXTS.get(text) or _REFUSAL_HEADS.get(_head(text))
    return reason.value if reason is not None else text


log = logging.getLogger(__name__)

# Fetches a fresh code for an account: from the service's API in the demo, from a key in tests.
CodeSource = Callable[[str], Awaitable[str]]


@dataclass
class Phone:
    """A driver's phone: shows the current code and fetches a new one before it expires."""

    account_id: str
    source: CodeSource
    clock: Clock
    refresh_before: timedelta = timedelta(seconds=15)
    _code: str | None = None
    _expires_at: datetime | None = None

    def code_used(self) -> None:
        """The app learns its code opened a gate and shows a fresh one next time."""
        self._code = None

    async def current_code(self) -> str:
        now = self.clock.now()
        if (
            self._code is None
            or self._expires_at is None
            or (self._expires_at - now <= self.refresh_before)
        ):
            self._code = await self.source(self.account_id)
            self._expires_at = parse_code(self._code).expires_at
        return self._code


@dataclass
class Driver:
    name: str
    phone: Phone
    inside: bool = False


@dataclass
class Lane:
    """One lane of the simulated lot: its scene, its barrier and a queue of one car at a time."""

    scene: LaneScene
    gate: Gate
    display: _Display | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Display(Protocol):
    @property
    def last(self) -> str | None: ...

    @property
    def texts(self) -> list[str]: ...


@dataclass(frozen=True)
class LaneOutcome:
    opened: bool
    waited_s: float  # from showing the code to the barrier opening or a refusal
    message: str | None = None
    refused: bool = False  # the display said no (False with opened=False: no answer at all)
    presentations: int = 1  # times the phone was held up


async def pass_lane(
    lane: Lane,
    driver: Driver,
    *,
    timeout: float = 10.0,
    drive_through_s: float = 0.5,
    poll_s: float = 0.01,
    represent_after_s: float | None = None,
) -> LaneOutcome:
    """Drive up, show the code, wait for the barrier, drive through (or back off).

    The attempt ends when the barrier opens, when the display shows a refusal (with a
    display to read), or after ``timeout``. With ``represent_after_s`` a driver whose code
    is not read lowers the phone and holds it up again (a new angle, new glare) that often.
    """
    loop = asyncio.get_running_loop()
    async with lane.lock:
        lane.scene.vehicle_arrives(driver.name)
        code = await driver.phone.current_code()
        shown_before = len(lane.display.texts) if lane.display is not None else 0
        started = loop.time()
        lane.scene.show_code(code)
        deadline = started + timeout
        represent_at = started + represent_after_s if represent_after_s else None
        opened = refused = False
        presentations = 1
        while loop.time() < deadline:
            if lane.gate.is_open:
                opened = True
                break
            # The lane opens the barrier and shows its text in one step, so a new answer
            # on the display with the barrier still down is a refusal.
            if lane.display is not None and any(
                text not in _PENDING_TEXTS for text in lane.display.texts[shown_before:]
            ):
                refused = True
                break
            if represent_at is not None and loop.time() >= represent_at:
                lane.scene.show_code(None)
                await asyncio.sleep(poll_s)
                lane.scene.show_code(code)
                presentations += 1
                represent_at = loop.time() + (represent_after_s or 0)
            await asyncio.sleep(poll_s)
        waited = loop.time() - started
        message = lane.display.last if lane.display is not None else None
        lane.scene.show_code(None)
        if opened:
            driver.phone.code_used()
            await asyncio.sleep(drive_through_s)
        lane.scene.vehicle_leaves()
        # Let the barrier come down before the next car pulls up.
        close_deadline = loop.time() + timeout
        while lane.gate.is_open and loop.time() < close_deadline:  # noqa: ASYNC110 - polls hardware
            await asyncio.sleep(poll_s)
        return LaneOutcome(
            opened=opened,
            waited_s=waited,
            message=message,
            refused=refused,
            presentations=presentations,
        )


@dataclass
class TrafficStats:
    arrivals: int = 0
    entries: int = 0
    exits: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)

    def summary(self) -> str:
        waits = sorted(self.waits)
        p50 = waits[len(waits) // 2] * 1000 if waits else 0.0
        denied = ", ".join(f"{k}: {v}" for k, v in self.denied.items()) or "none"
        return (
            f"arrivals {self.arrivals}, entries {self.entries}, exits {self.exits}, "
            f"denied ({denied}), median wait at the barrier {p50:.0f} ms"
        )


async def run_traffic(
    drivers: list[Driver],
    entry: Lane,
    exit_: Lane,
    *,
    rng: random.Random,
    arrivals_per_minute: float,
    dwell_s: tuple[float, float],
    stop: asyncio.Event,
    stats: TrafficStats | None = None,
    on_event: Callable[[str], None] | None = None,
    represent_after_s: float = 2.5,
) -> TrafficStats:
    """Poisson arrivals until ``stop`` is set; each car enters, parks, and leaves.

    A driver whose code gets no reaction for ``represent_after_s`` lowers the phone and
    holds it up again, as real drivers do: a simulated camera serves the frame it rendered
    for a code until the view changes, so a rendering the decoder misses would otherwise
    stay missed for the whole attempt."""
    stats = stats or TrafficStats()
    report = on_event or (lambda text: log.info("%s", text))
    visits: set[asyncio.Task[None]] = set()

    async def visit(driver: Driver) -> None:
        stats.arrivals += 1
        outcome = await pass_lane(entry, driver, represent_after_s=represent_after_s)
        stats.waits.append(outcome.waited_s)
        if not outcome.opened:
            stats.denied[outcome.message or "no answer"] += 1
            report(f"{driver.name}: entry refused: {outcome.message}")
            return
        driver.inside = True
        stats.entries += 1
        report(f"{driver.name}: entered: {outcome.message} ({outcome.waited_s * 1000:.0f} ms)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(*dwell_s))
        for _attempt in range(3):
            outcome = await pass_lane(exit_, driver, represent_after_s=represent_after_s)
            stats.waits.append(outcome.waited_s)
            if outcome.opened:
                driver.inside = False
                stats.exits += 1
                report(f"{driver.name}: left: {outcome.message} ({outcome.waited_s * 1000:.0f} ms)")
                return
            stats.denied[outcome.message or "no answer"] += 1
            report(f"{driver.name}: exit refused: {outcome.message}")
            if stop.is_set():
                return
            await asyncio.sleep(2)

    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.expovariate(arrivals_per_minute / 60))
        if stop.is_set():
            break
        candidates = [d for d in drivers if not d.inside and d.name not in _busy(visits)]
        if not candidates:
            continue
        driver = rng.choice(candidates)
        task = asyncio.create_task(visit(driver), name=driver.name)
        visits.add(task)
        task.add_done_callback(visits.discard)
    for task in list(visits):
        task.cancel()
    await asyncio.gather(*visits, return_exceptions=True)
    return stats


def _busy(tasks: set[asyncio.Task[None]]) -> set[str]:
    return {task.get_name() for task in tasks}
