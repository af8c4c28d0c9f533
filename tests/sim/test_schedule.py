"""The fleet's shared timers, and the simulated camera's cadence and shared code-less frames."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gateway_firmware.hardware.interfaces import CameraError, Decoder
from sim_devices import schedule
from sim_devices.camera import EMPTY_FRAMES, SimCamera
from sim_devices.render import NOISY
from sim_devices.scene import LaneScene
from sim_devices.schedule import SharedTimer, Ticker


async def test_sleepers_due_in_one_slot_share_one_loop_timer() -> None:
    timer = SharedTimer(resolution=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    woken: list[float] = []
    late: list[float] = []

    async def sleeper(delay: float) -> None:
        await timer.sleep(delay)
        woken.append(loop.time() - started)
        late.append(loop.time() - started - delay)

    await asyncio.gather(*(sleeper(0.001 * i) for i in range(1, 11)), sleeper(0.09))
    assert min(late) >= -0.001  # never early (the loop's clock resolution aside) ...
    assert max(woken[:10]) < 0.2  # ... and late by about one slot at most
    assert woken[-1] >= 0.09
    assert timer.wakeups <= 4  # eleven sleeps, two or three slots (one more at a boundary)


async def test_a_cancelled_sleeper_does_not_disturb_the_others_of_its_slot() -> None:
    timer = SharedTimer(resolution=0.01)
    first = asyncio.create_task(timer.sleep(0.02))
    second = asyncio.create_task(timer.sleep(0.02))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert first.cancelled()
    assert second.done() and not second.cancelled()


async def test_a_zero_sleep_still_yields_to_the_loop() -> None:
    timer = SharedTimer()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    await timer.sleep(0)
    assert ran == ["other"]
    await task


async def test_ticker_calls_every_callback_each_period_until_stopped() -> None:
    ticker = Ticker()
    calls: dict[str, int] = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    stop_a = ticker.every(0.01, lambda: bump("a"))
    stop_b = ticker.every(0.01, lambda: bump("b"))
    assert ticker.callbacks == 2
    await asyncio.sleep(0.105)
    stop_a()
    seen_a = calls["a"]
    assert 5 <= seen_a <= 11
    assert abs(calls["b"] - seen_a) <= 1  # the same rounds
    await asyncio.sleep(0.05)
    assert calls["a"] == seen_a  # stopped
    assert calls["b"] > seen_a
    stop_b()
    assert ticker.callbacks == 0


async def test_ticker_keeps_ticking_the_others_when_one_callback_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The module's logger itself, not the logging tree: the deterministic simulation
    # silences sim_devices' loggers when it runs earlier in the same process.
    reported: list[str] = []
    monkeypatch.setattr(schedule.log, "exception", lambda msg, *a, **k: reported.append(msg))
    ticker = Ticker()
    calls = 0

    def broken() -> None:
        raise RuntimeError("a gate's bug")

    def counting() -> None:
        nonlocal calls
        calls += 1

    stops = [ticker.every(0.01, broken), ticker.every(0.01, counting)]
    await asyncio.sleep(0.06)
    for stop in stops:
        stop()
    assert calls >= 3
    assert "a tick callback failed" in reported


def test_bad_periods_and_resolutions_are_refused() -> None:
    with pytest.raises(ValueError, match="resolution"):
        SharedTimer(resolution=0)
    with pytest.raises(ValueError, match="period"):
        asyncio.run(_every_zero())


async def _every_zero() -> None:
    Ticker().every(0, lambda: None)


# -- the simulated camera ------------------------------------------------------------------
def test_a_reader_late_by_less_than_a_frame_keeps_the_cameras_cadence() -> None:
    """A real camera captures on its own clock: a frame read late does not delay the next.

    The reader alternates a slow frame (late for the next by most of an interval) and a
    quick one; on average it keeps up, so it gets a frame every interval. (A camera whose
    cadence restarted from each late read would take 4 x (0.18 + 0.1) = 1.12 s here.)
    """
    camera = SimCamera(lambda: None, frame_interval=0.1)
    camera.read()
    started = time.monotonic()
    for _ in range(4):
        time.sleep(0.18)
        camera.read()  # the frame captured at +0.1 or so, at once
        time.sleep(0.01)
        camera.read()  # waits for the next on the cadence
    elapsed = time.monotonic() - started
    assert 0.78 <= elapsed < 0.96


def test_a_reader_whole_frames_behind_gets_the_latest_then_the_cadence() -> None:
    camera = SimCamera(lambda: None, frame_interval=0.02)
    camera.read()
    time.sleep(0.105)  # five frames captured meanwhile
    started = time.monotonic()
    camera.read()  # the latest, at once
    assert time.monotonic() - started < 0.015
    for _ in range(3):
        camera.read()  # then one per interval: not a burst of the old ones
    assert time.monotonic() - started >= 0.04


async def test_async_reads_on_a_shared_timer_are_paced() -> None:
    timer = SharedTimer(resolution=0.005)
    camera = SimCamera(lambda: None, frame_interval=0.02, timer=timer)
    started = time.monotonic()
    for _ in range(6):
        await camera.read_async()
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 0.3  # the first at once, then five intervals
    assert timer.wakeups >= 4


async def test_code_less_frames_are_shared_not_rendered_per_camera() -> None:
    scenes = [LaneScene() for _ in range(20)]
    cameras = [
        SimCamera(scene, rng=np.random.default_rng(i), frame_interval=0)
        for i, scene in enumerate(scenes)
    ]
    empties = [await camera.read_async() for camera in cameras]
    assert all(camera.renders == 0 for camera in cameras)
    assert len({id(frame) for frame in empties}) <= EMPTY_FRAMES  # a few, shared
    assert all(frame is not None and not frame.flags.writeable for frame in empties)
    # Unchanged scene: the very same frame again (the gateway skips decoding it).
    assert await cameras[0].read_async() is empties[0]
    scenes[0].show_code("QP1.k1.alice")
    with_code = await cameras[0].read_async()
    assert cameras[0].renders == 1  # a code in view is rendered for this camera
    assert with_code is not None and with_code is not empties[0]
    scenes[0].vehicle_leaves()
    again = await cameras[0].read_async()
    assert again is not None and again is not with_code
    assert cameras[0].renders == 1


def test_code_less_frames_are_real_scenes_without_a_code(zxing_decoder: Decoder) -> None:
    camera = SimCamera(lambda: None, variant=NOISY, rng=np.random.default_rng(3), frame_interval=0)
    frame = camera.read()
    assert frame is not None and frame.shape == (480, 640)
    assert frame.std() > 5  # a textured scene, not a blank
    assert zxing_decoder.decode(frame) == []
    shown = SimCamera(lambda: "QP1.k1.alice", variant=NOISY, frame_interval=0).read()
    assert shown is not None
    assert zxing_decoder.decode(shown) == ["QP1.k1.alice"]  # the same decoder reads codes


def test_failures_still_apply_to_shared_code_less_frames() -> None:
    camera = SimCamera(lambda: None, frame_interval=0)
    camera.read()
    camera.fail_next(1)
    with pytest.raises(CameraError, match="glitch"):
        camera.read()
    assert camera.read() is not None


@pytest.fixture
def zxing_decoder() -> Decoder:
    from gateway_firmware.hardware.decoders import make_decoder

    try:
        return make_decoder("zxing")
    except Exception as exc:  # zxing-cpp missing
        pytest.skip(f"zxing-cpp is unavailable: {exc}")
