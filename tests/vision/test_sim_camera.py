"""The simulated camera shows what the scene holds up, paced and breakable like a real one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from vision_support import CodeFactory

from gateway_firmware.hardware.interfaces import Camera, CameraError, Decoder
from sim_devices.camera import SimCamera
from sim_devices.render import NOISY
from sim_devices.scene import LaneScene


def test_sim_camera_is_a_camera() -> None:
    assert isinstance(SimCamera(lambda: None, frame_interval=0), Camera)


def test_frames_decode_to_the_code_in_view(zxing: Decoder, code: CodeFactory) -> None:
    scene = LaneScene()
    camera = SimCamera(scene, rng=np.random.default_rng(1), variant=NOISY, frame_interval=0)
    frame = camera.read()
    assert frame is not None
    assert frame.shape == (480, 640)
    assert zxing.decode(frame) == []
    scene.show_code(code(1))
    assert zxing.decode(camera.read()) == [code(1)]  # type: ignore[arg-type]
    scene.show_code(code(2))
    assert zxing.decode(camera.read()) == [code(2)]  # type: ignore[arg-type]
    scene.vehicle_leaves()
    assert zxing.decode(camera.read()) == []  # type: ignore[arg-type]


def test_a_plain_callable_is_a_scene(zxing: Decoder, code: CodeFactory) -> None:
    shown: list[str | None] = [code(3)]
    camera = SimCamera(lambda: shown[0], frame_interval=0)
    assert zxing.decode(camera.read()) == [code(3)]  # type: ignore[arg-type]


def test_unchanged_scene_renders_once(code: CodeFactory) -> None:
    scene = LaneScene()
    scene.show_code(code(4))
    camera = SimCamera(scene, frame_interval=0)
    first = camera.read()
    for _ in range(20):
        assert np.array_equal(camera.read(), first)  # type: ignore[arg-type]
    assert (camera.renders, camera.frames_read) == (1, 21)
    scene.show_code(code(5))
    camera.read()
    camera.read()
    assert camera.renders == 2


def test_per_frame_renders_every_frame_afresh(code: CodeFactory) -> None:
    camera = SimCamera(lambda: code(6), variant=NOISY, per_frame=True, frame_interval=0)
    a, b = camera.read(), camera.read()
    assert camera.renders == 2
    assert not np.array_equal(a, b)  # type: ignore[arg-type]


def test_returned_frames_are_the_callers_to_draw_on(code: CodeFactory) -> None:
    camera = SimCamera(lambda: code(7), frame_interval=0)
    first = camera.read()
    assert first is not None
    first[:] = 0
    assert camera.read().any()  # type: ignore[union-attr]


def test_random_variant_per_hold_mostly_reads(zxing: Decoder, code: CodeFactory) -> None:
    scene = LaneScene()
    camera = SimCamera(scene, rng=np.random.default_rng(2), frame_interval=0)
    hits = 0
    for i in range(12):
        scene.show_code(code(100 + i))
        hits += zxing.decode(camera.read()) == [code(100 + i)]  # type: ignore[arg-type]
    assert camera.renders == 12
    assert hits >= 10  # random_variant mixes hard cases; zxing reads ~95 % of them


def test_fail_next_raises_then_recovers(code: CodeFactory) -> None:
    camera = SimCamera(lambda: code(8), frame_interval=0)
    camera.fail_next(2)
    for _ in range(2):
        with pytest.raises(CameraError, match="glitch"):
            camera.read()
    assert camera.read() is not None


def test_set_failed_fails_until_cleared(code: CodeFactory) -> None:
    camera = SimCamera(lambda: code(9), frame_interval=0)
    camera.set_failed(True)
    for _ in range(3):
        with pytest.raises(CameraError):
            camera.read()
    camera.set_failed(False)
    assert camera.read() is not None


def test_read_after_close_raises() -> None:
    camera = SimCamera(lambda: None, frame_interval=0)
    camera.close()
    with pytest.raises(CameraError, match="closed"):
        camera.read()


def test_reads_are_paced_at_the_frame_interval() -> None:
    camera = SimCamera(lambda: None, frame_interval=0.03)
    started = time.monotonic()
    for _ in range(5):
        camera.read()
    elapsed = time.monotonic() - started
    assert 0.11 <= elapsed < 0.5  # the first frame at once, then four intervals


def test_a_late_reader_gets_the_next_frame_at_once() -> None:
    camera = SimCamera(lambda: None, frame_interval=0.05)
    camera.read()
    time.sleep(0.12)  # the app was busy for more than two frames
    started = time.monotonic()
    camera.read()
    assert time.monotonic() - started < 0.03


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="frame_interval"):
        SimCamera(lambda: None, frame_interval=-1)
    with pytest.raises(ValueError, match="n must"):
        SimCamera(lambda: None).fail_next(-1)


def test_a_worker_thread_reads_while_the_scene_changes(zxing: Decoder, code: CodeFactory) -> None:
    scene = LaneScene()
    camera = SimCamera(scene, frame_interval=0.001)
    shown = {code(200 + i) for i in range(5)}
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                seen.extend(zxing.decode(camera.read()))  # type: ignore[arg-type]
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    for text in sorted(shown):
        scene.show_code(text)
        deadline = time.monotonic() + 5
        while text not in seen and not errors and time.monotonic() < deadline:
            time.sleep(0.005)
        scene.show_code(None)
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=5)
    assert not errors
    assert set(seen) == shown  # every code was read, and nothing else
