from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from gateway_firmware.app import Hardware
from gateway_firmware.config import GatewaySettings
from gateway_firmware.hardware.interfaces import (
    Camera,
    CameraError,
    Decoder,
    Display,
    PresenceDetector,
)
from parking_protocol.clock import FakeClock
from sim_devices.devices import (
    MarkerDecoder,
    ScriptedCamera,
    SimDisplay,
    SimGate,
    SimPresence,
    marker_frame,
    sim_hardware,
)


def test_sim_gate_timeline_is_stamped_by_the_clock(clock: FakeClock) -> None:
    gate = SimGate(clock)
    t0 = clock.now()
    gate.open()
    clock.advance(timedelta(seconds=2))
    gate.open()
    gate.close()
    assert gate.timeline == [(t0, "open"), (t0 + timedelta(seconds=2), "close")]
    gate.assert_events(["open", "close"])
    with pytest.raises(AssertionError, match="gate timeline"):
        gate.assert_events(["open"])


def test_sim_gate_catches_a_close_on_a_vehicle(clock: FakeClock) -> None:
    presence = SimPresence(clock)
    gate = SimGate(clock, presence=presence)
    gate.open()
    presence.arrive()
    gate.close()
    with pytest.raises(AssertionError, match="closed on a vehicle"):
        gate.assert_never_closed_on_vehicle()
    assert presence.timeline == [(clock.now(), "arrive")]


def test_scripted_camera_plays_frames_errors_then_none() -> None:
    frame = marker_frame("QP1.a")
    camera = ScriptedCamera([frame, CameraError("gone")])
    assert isinstance(camera, Camera)
    assert camera.read() is frame
    with pytest.raises(CameraError):
        camera.read()
    assert camera.read() is None
    camera.close()
    assert camera.closed


def test_repeating_camera_keeps_seeing_the_last_frame() -> None:
    camera = ScriptedCamera(repeat=True)
    camera.push_code("QP1.a")
    first = camera.read()
    assert first is not None
    assert camera.read() is first


def test_marker_decoder_reads_marker_frames_only() -> None:
    decoder = MarkerDecoder()
    assert isinstance(decoder, Decoder)
    assert decoder.decode(marker_frame("QP1.k1.alice")) == ["QP1.k1.alice"]
    assert decoder.decode(np.zeros((480, 640), dtype=np.uint8)) == []


def test_sim_display_and_presence_implement_their_interfaces(clock: FakeClock) -> None:
    display = SimDisplay(clock)
    display.show("Welcome")
    assert isinstance(display, Display)
    assert (display.texts, display.last) == (["Welcome"], "Welcome")
    assert isinstance(SimPresence(), PresenceDetector)


def test_sim_hardware_follows_the_settings(make_settings: object) -> None:
    assert callable(make_settings)
    with_loop: GatewaySettings = make_settings(gpio={"presence_pin": 23})
    hardware = sim_hardware(with_loop)
    assert isinstance(hardware, Hardware)
    assert isinstance(hardware.presence, SimPresence)
    assert sim_hardware(make_settings()).presence is None


def test_sim_hardware_with_a_scene_renders_and_decodes_real_qr_frames(
    make_settings: object, issue: object
) -> None:
    from sim_devices.camera import SimCamera
    from sim_devices.scene import LaneScene

    assert callable(make_settings)
    assert callable(issue)
    scene = LaneScene()
    hardware = sim_hardware(make_settings(gpio={"presence_pin": 23}), scene=scene)
    assert isinstance(hardware.camera, SimCamera)
    assert hardware.presence is scene
    code = issue()
    scene.vehicle_arrives("car-1")
    scene.show_code(code)
    frame = hardware.camera.read()
    assert frame is not None
    assert hardware.decoder.decode(frame) == [code]
    assert hardware.presence.vehicle_present
