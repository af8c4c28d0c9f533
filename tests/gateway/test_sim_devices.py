from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest

from gateway_firmware.app import Hardware
from gateway_firmware.config import GatewaySettings
from gateway_firmware.hardware.gpio import GpioPresence, RelayGate
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
    SimIndicator,
    SimPresence,
    marker_frame,
    sim_hardware,
    sim_lane_devices,
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


def test_sim_hardware_follows_the_settings(make_settings: Callable[..., GatewaySettings]) -> None:
    hardware = sim_hardware(make_settings(gpio={"presence_pin": 23}))
    assert isinstance(hardware, Hardware)
    assert isinstance(hardware.presence, GpioPresence)
    assert isinstance(hardware.gate, RelayGate)
    hardware.close()
    without = sim_hardware(make_settings())
    assert without.presence is None
    without.close()


def test_sim_lane_runs_the_gpiozero_adapters_on_mock_pins(
    make_settings: Callable[..., GatewaySettings], clock: FakeClock
) -> None:
    """The relay and detector are the firmware's gpiozero classes on the lane's own
    MockFactory; the scene drives the detector pin, the timeline comes from the relay pin."""
    from gpiozero.pins.mock import MockFactory

    from sim_devices.pins import ObservedPin

    devices = sim_lane_devices(make_settings(gpio={"presence_pin": 23}), clock=clock)
    hardware, pins = devices.hardware, devices.pins
    assert isinstance(pins, MockFactory)
    relay_pin, loop_pin = pins.pin(17), pins.pin(23)
    assert isinstance(relay_pin, ObservedPin)
    assert isinstance(hardware.gate, RelayGate)
    assert isinstance(hardware.presence, GpioPresence)

    devices.scene.vehicle_arrives("car-1")
    assert loop_pin.state is False  # pulled low by the vehicle (presence_pull_up)
    assert hardware.presence.vehicle_present
    t0 = clock.now()
    hardware.gate.open()  # what the firmware calls: the observer sees the pin move
    assert relay_pin.state is True
    assert devices.gate.is_open
    clock.advance(timedelta(seconds=3))
    hardware.gate.close()  # with the car still there: recorded as unsafe
    devices.scene.vehicle_leaves()
    assert loop_pin.state is True
    assert not hardware.presence.vehicle_present
    assert devices.gate.timeline == [(t0, "open"), (t0 + timedelta(seconds=3), "close")]
    assert devices.gate.closed_on_vehicle == [t0 + timedelta(seconds=3)]
    hardware.close()


def test_sim_detector_and_relay_follow_their_wiring_settings(
    make_settings: Callable[..., GatewaySettings], clock: FakeClock
) -> None:
    settings = make_settings(
        gpio={"presence_pin": 23, "presence_pull_up": False, "relay_active_high": False}
    )
    devices = sim_lane_devices(settings, clock=clock)
    relay_pin, loop_pin = devices.pins.pin(17), devices.pins.pin(23)
    assert (relay_pin.state, loop_pin.state) == (True, False)  # active-low relay: closed high
    devices.scene.vehicle_arrives("car-1")
    assert loop_pin.state is True  # a powered output drives the line high
    assert devices.hardware.presence is not None
    assert devices.hardware.presence.vehicle_present
    devices.gate.open()  # the observer also drives its relay
    assert relay_pin.state is False
    assert devices.gate.events() == ["open"]
    devices.hardware.close()


def test_every_sim_lane_has_its_own_pins(make_settings: Callable[..., GatewaySettings]) -> None:
    settings = make_settings(gpio={"presence_pin": 23})
    first, second = sim_lane_devices(settings), sim_lane_devices(settings)
    assert first.pins is not second.pins
    first.hardware.gate.open()
    assert not second.hardware.gate.is_open
    first.hardware.close()
    second.hardware.close()


def test_sim_lamps_and_buzzer_are_driven_when_configured(
    make_settings: Callable[..., GatewaySettings],
) -> None:
    lamps = sim_lane_devices(make_settings(gpio={"green_led_pin": 22, "red_led_pin": 27}))
    assert isinstance(lamps.hardware.indicator, RelayGate)
    assert lamps.pins.pin(27).state is True  # red: closed
    lamps.hardware.close()
    plain = sim_lane_devices(make_settings())
    assert isinstance(plain.hardware.indicator, SimIndicator)
    plain.hardware.close()


def test_a_pin_clash_in_the_simulator_is_refused_by_gpiozero_itself(
    make_settings: Callable[..., GatewaySettings],
) -> None:
    """What the config validator prevents: gpiozero itself refuses a pin used twice."""
    from gpiozero import GPIOPinInUse

    settings = make_settings()
    clashing = settings.model_copy(
        update={"gpio": settings.gpio.model_copy(update={"presence_pin": 17})}
    )
    with pytest.raises(GPIOPinInUse):
        sim_lane_devices(clashing)


def test_sim_hardware_with_a_scene_renders_and_decodes_real_qr_frames(
    make_settings: Callable[..., GatewaySettings], issue: Callable[..., str]
) -> None:
    from sim_devices.camera import SimCamera
    from sim_devices.scene import LaneScene

    scene = LaneScene()
    hardware = sim_hardware(make_settings(gpio={"presence_pin": 23}), scene=scene)
    assert isinstance(hardware.camera, SimCamera)
    code = issue()
    scene.vehicle_arrives("car-1")
    scene.show_code(code)
    frame = hardware.camera.read()
    assert frame is not None
    assert hardware.decoder.decode(frame) == [code]
    assert hardware.presence is not None
    assert hardware.presence.vehicle_present
    hardware.close()
