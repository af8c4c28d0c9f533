"""Lane hardware beyond the barrier: feedback lamps/buzzer, display, camera that comes and
goes, the decode pipeline's settings, the deny-list kept across restarts, structured logs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory
from gw_support import LOT, Harness, eventually

from gateway_firmware.app import FileDisplay, camera_opener, real_hardware
from gateway_firmware.cli import JsonFormatter
from gateway_firmware.config import CameraSettings, ConfigError, GatewaySettings, load_settings
from gateway_firmware.hardware.camera_opencv import ReopeningCamera
from gateway_firmware.hardware.decoders import PipelineDecoder
from gateway_firmware.hardware.gpio import RelayGate
from gateway_firmware.hardware.interfaces import CameraError, Frame
from parking_protocol.messages import DenyList, encode, new_id
from parking_protocol.topics import denylist_topic
from parking_protocol.types import DENY_TEXT, Reason
from sim_devices.devices import SimIndicator


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    pins = MockFactory()
    yield pins
    pins.close()


def indicator(h: Harness) -> SimIndicator:
    device = h.gateway.hardware.indicator
    assert isinstance(device, SimIndicator)
    return device


# -- feedback ---------------------------------------------------------------------------------
async def test_accepted_and_denied_codes_signal_the_driver(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open)
    assert indicator(h).signals == ["accepted"]
    h.clock.advance(timedelta(seconds=h.settings.timeouts.open_hold_s))
    await eventually(lambda: not h.gate.is_open)
    h.camera.push_code("not a parking code")
    await eventually(lambda: indicator(h).signals == ["accepted", "denied"])


def test_relay_gate_beeps_once_on_accept_and_flashes_red_on_deny(factory: MockFactory) -> None:
    gate = RelayGate(17, green_led_pin=22, red_led_pin=27, buzzer_pin=5, pin_factory=factory)
    buzzer, red = factory.pin(5), factory.pin(27)
    gate.open()
    gate.signal("accepted")
    time.sleep(0.3)
    assert [s.state for s in buzzer.states] == [False, True, False]
    gate.close()
    buzzer.clear_states()
    red.clear_states()
    gate.signal("denied")
    time.sleep(RelayGate.FLASH_S * 6 + 0.3)
    assert [s.state for s in buzzer.states].count(True) == 2
    assert [s.state for s in red.states].count(True) >= 3  # three flashes...
    assert red.state is True  # ...then steady red: the barrier is closed
    gate.release()


def test_file_display_replaces_the_text(tmp_path: Path) -> None:
    display = FileDisplay(tmp_path / "run" / "display.txt")
    display.show("Paid ¥12.00 - thank you")
    display.show(DENY_TEXT[Reason.CODE_EXPIRED])
    assert (tmp_path / "run" / "display.txt").read_text() == "Code expired - refresh your code\n"


# -- camera ---------------------------------------------------------------------------------
class FlakyCamera:
    def __init__(self) -> None:
        self.closed = False

    def read(self) -> Frame | None:
        return np.zeros((480, 640), np.uint8)

    def close(self) -> None:
        self.closed = True


def test_reopening_camera_survives_a_missing_and_a_failing_camera() -> None:
    attempts: list[int] = []
    cameras: list[FlakyCamera] = []

    def opener() -> FlakyCamera:
        attempts.append(1)
        if len(attempts) == 1:
            raise CameraError("cannot open camera 0 (missing)")
        cameras.append(FlakyCamera())
        return cameras[-1]

    camera = ReopeningCamera(opener, name="opencv:0")
    with pytest.raises(CameraError, match="missing"):
        camera.read()
    assert camera.read() is not None  # plugged in: opened on the next read
    cameras[0].read = lambda: (_ for _ in ()).throw(CameraError("unplugged"))  # type: ignore[method-assign]
    with pytest.raises(CameraError, match="unplugged"):
        camera.read()
    assert cameras[0].closed
    assert camera.read() is not None  # a fresh device
    assert (len(attempts), camera.opens) == (3, 2)


def test_real_hardware_starts_without_a_camera(
    make_settings: Callable[..., GatewaySettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing camera is a retried CameraError in the scan loop, not a failed start."""
    monkeypatch.setattr(Device, "pin_factory", MockFactory())
    settings = make_settings(
        hardware="real",
        camera={"backend": "opencv", "device": "/dev/video-none"},
        decode={"roi": (100, 50, 400, 380)},
        gpio={"buzzer_pin": 5, "red_led_pin": 27},
    )
    hardware = real_hardware(settings)
    try:
        with pytest.raises(CameraError, match="video-none"):
            hardware.camera.read()  # type: ignore[union-attr]
        assert isinstance(hardware.decoder, PipelineDecoder)
        assert hardware.decoder.roi == (100, 50, 400, 380)
        assert hardware.indicator is hardware.gate
    finally:
        hardware.close()
        Device.pin_factory.close()


def test_camera_backend_auto_prefers_picamera2_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return object() if name == "picamera2" else real_find_spec(name, *args)

    assert camera_opener(CameraSettings())[0] in ("opencv", "picamera2")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert camera_opener(CameraSettings())[0] == "picamera2"
    assert camera_opener(CameraSettings(device="/dev/video2"))[0] == "opencv"
    assert camera_opener(CameraSettings(backend="opencv"))[0] == "opencv"


async def test_unchanged_code_less_frames_are_not_decoded_again(harness: Harness) -> None:
    h = harness
    h.camera._repeat = True  # a still picture, as a simulated camera hands back
    h.camera.push(np.zeros((48, 64), np.uint8))
    await eventually(lambda: h.gateway.stats.frames >= 20, what="frames")
    decoder: Any = h.gateway.hardware.decoder
    assert decoder.calls == 1
    assert h.gateway.stats.frames_unchanged >= 19


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"decode": {"roi": [0, 0, 10, 10]}}, "decode.roi"),
        ({"decode": {"downscale": 2}}, "decode.downscale"),
        ({"camera": {"backend": "v4l1"}}, "camera.backend"),
    ],
)
def test_bad_pipeline_settings_name_the_field(
    tmp_path: Path, section: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(
            None,
            lot_id="lot1",
            gate_id="in1",
            direction="entry",
            hardware="sim",
            public_keys={"k1": "x" * 43},
            **section,
        )


# -- deny-list kept across a restart -------------------------------------------------------------
async def test_denylist_survives_a_restart_while_offline(
    harness_factory: Callable[..., Any], issue: Callable[..., str]
) -> None:
    first: Harness = await harness_factory()
    assert first.server.client is not None
    deny = DenyList(
        list_id=new_id(), lot_id=LOT, accounts=("mallory",), issued_at=first.clock.now()
    )
    await first.server.client.publish(denylist_topic(LOT), encode(deny), retain=True)
    await eventually(lambda: first.gateway.stats.denylist_updates == 1)
    await first.stop()
    first.gateway.close()
    first.broker.retained.pop(denylist_topic(LOT))  # the broker lost it, say

    second: Harness = await harness_factory()
    await second.broker.cut(second.client_id)
    second.camera.push_code(issue("mallory"))
    await eventually(lambda: second.display.last == DENY_TEXT[Reason.ACCOUNT_BLOCKED])
    assert second.gate.events() == []


# -- structured logs --------------------------------------------------------------------------
def test_json_logs_carry_the_lane_and_extra_fields() -> None:
    record = logging.LogRecord(
        "gateway_firmware.app", logging.INFO, "", 0, "event %s", ("e1",), None
    )
    record.event_id = "e1"
    entry = json.loads(JsonFormatter({"lot": "lot1", "gate": "in1"}).format(record))
    assert entry["lot"] == "lot1" and entry["gate"] == "in1"
    assert (entry["msg"], entry["event_id"]) == ("event e1", "e1")
