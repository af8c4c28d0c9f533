"""Simulated traffic (sim_devices.traffic) against a barrier that misses a code's first
presentation: what a simulated camera does when the decoder misses the frame it rendered
for a code, since it serves that frame again until the view changes."""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from parking_protocol.clock import SystemClock
from parking_protocol.qr_token import issue_code
from sim_devices.devices import SimGate
from sim_devices.scene import LaneScene
from sim_devices.traffic import Driver, Lane, Phone, TrafficStats, run_traffic

KEY = Ed25519PrivateKey.generate()


async def _code(account: str) -> str:
    return issue_code(KEY, kid="k1", account_id=account, now=datetime.now(UTC))


async def _barrier_reading_second_presentations(lane: Lane, reads: list[str]) -> None:
    """Opens for a code only once it has been held up a second time; closes once the car
    has gone."""
    presentations = 0
    last: str | None = None
    while True:
        code = lane.scene.code_in_view()
        if code != last:
            presentations += code is not None
            last = code
        if presentations >= 2 and code is not None:
            reads.append(code)
            lane.gate.open()
            while lane.scene.vehicle_present:  # noqa: ASYNC110 - polls the scene
                await asyncio.sleep(0.005)
            lane.gate.close()
            presentations, last = 0, None
        if not lane.scene.vehicle_present:
            presentations, last = 0, None
        await asyncio.sleep(0.005)


async def test_a_driver_whose_code_is_not_read_holds_the_phone_up_again() -> None:
    entry = Lane(scene=LaneScene("in"), gate=SimGate())
    exit_ = Lane(scene=LaneScene("out"), gate=SimGate())
    reads: list[str] = []
    barriers = [
        asyncio.create_task(_barrier_reading_second_presentations(lane, reads))
        for lane in (entry, exit_)
    ]
    stop = asyncio.Event()
    stats = TrafficStats()
    driver = Driver("d1", Phone("d1", _code, SystemClock()))
    traffic = asyncio.create_task(
        run_traffic(
            [driver],
            entry,
            exit_,
            rng=random.Random(1),
            arrivals_per_minute=600,
            dwell_s=(0.05, 0.1),
            stop=stop,
            stats=stats,
            represent_after_s=0.2,
        )
    )
    try:
        async with asyncio.timeout(8):
            while stats.exits < 1:  # noqa: ASYNC110 - polls the counters
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(traffic, 5)
        for task in barriers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert stats.entries >= 1 and stats.exits >= 1
    assert not stats.denied, stats.denied
    assert len(reads) >= 2
