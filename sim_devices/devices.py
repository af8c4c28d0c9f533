"""Simulated lane devices that record what happened, gpiozero-mock style.

Each device implements a :mod:`gateway_firmware.hardware.interfaces` protocol and keeps a
timeline of ``(timestamp, event)`` pairs stamped by a :class:`~parking_protocol.clock.Clock`
(pass the test's FakeClock and the timeline is deterministic), so tests assert on what the
barrier did and when.

>>> gate = SimGate()
>>> gate.open(); gate.open(); gate.close()
>>> gate.events()
['open', 'close']

The simulator (:func:`sim_lane_devices`, :func:`sim_hardware`) runs the firmware's real
gpiozero adapters, the relay :class:`~gateway_firmware.hardware.gpio.RelayGate` and the
detector :class:`~gateway_firmware.hardware.gpio.GpioPresence`, on a gpiozero
``MockFactory`` of its own per lane (:mod:`sim_devices.pins`; chosen explicitly, never a
fallback): the :class:`~sim_devices.scene.LaneScene` drives the detector's mock pin, and a
:class:`SimGate` observes the relay's mock pin for its timeline and barrier-safety record.

The rendering camera (real QR codes in frames) is :mod:`sim_devices.camera`; here is only a
:class:`ScriptedCamera` that plays queued frames, plus marker frames that carry a code's text
directly and a :class:`MarkerDecoder` that reads them, for fast tests without OpenCV.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway_firmware.app import Hardware
from gateway_firmware.hardware.interfaces import (
    Camera,
    CameraError,
    Decoder,
    Frame,
    Gate,
    PresenceDetector,
)
from parking_protocol.clock import Clock, SystemClock

if TYPE_CHECKING:
    from gateway_firmware.config import GatewaySettings
    from sim_devices.scene import LaneScene

__all__ = [
    "MARKER",
    "MarkerDecoder",
    "ScriptedCamera",
    "SimDevices",
    "SimDisplay",
    "SimGate",
    "SimIndicator",
    "SimPresence",
    "Timeline",
    "idle_lane_hardware",
    "marker_frame",
    "sim_hardware",
    "sim_lane_devices",
]

Timeline = list[tuple[datetime, str]]


class SimGate:
    """A barrier that records ``open``/``close`` changes (idempotent, like the relay).

    With ``presence``, every close also records whether a vehicle was under the barrier, and
    :meth:`assert_never_closed_on_vehicle` fails if one was.

    Standalone (``SimGate(clock)``) it is a plain-Python barrier. :meth:`observing` makes it
    a thin observer of a real relay adapter on a gpiozero mock pin instead: the timeline is
    the relay pin's changes (stamped by ``clock``), and ``open``/``close`` drive the relay.
    """

    def __init__(
        self, clock: Clock | None = None, *, presence: PresenceDetector | None = None
    ) -> None:
        self._clock = clock or SystemClock()
        self._presence = presence
        self._lock = threading.Lock()
        self._open = False
        self._relay: Gate | None = None
        self.timeline: Timeline = []
        self.closed_on_vehicle: list[datetime] = []

    @classmethod
    def observing(
        cls,
        relay: Gate,
        relay_pin: Any,
        *,
        active_high: bool = True,
        clock: Clock | None = None,
        presence: PresenceDetector | None = None,
    ) -> SimGate:
        """The timeline of ``relay`` (e.g. a RelayGate) read from its ``relay_pin`` (an
        :class:`~sim_devices.pins.ObservedPin`): the barrier is open while the pin is at
        ``active_high``."""
        gate = cls(clock, presence=presence)
        gate._relay = relay
        gate._open = relay.is_open
        relay_pin.listeners.append(lambda level: gate._moved(open_=level == active_high))
        return gate

    def open(self) -> None:
        if self._relay is not None:
            self._relay.open()  # the pin's change comes back through _moved
            return
        with self._lock:
            if not self._open:
                self._open = True
                self.timeline.append((self._clock.now(), "open"))

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            return
        with self._lock:
            if self._presence is not None and self._presence.vehicle_present:
                self.closed_on_vehicle.append(self._clock.now())
            if self._open:
                self._open = False
                self.timeline.append((self._clock.now(), "close"))

    def _moved(self, *, open_: bool) -> None:
        """The observed relay pin changed: the barrier moved."""
        with self._lock:
            now = self._clock.now()
            if not open_ and self._presence is not None and self._presence.vehicle_present:
                self.closed_on_vehicle.append(now)
            self._open = open_
            self.timeline.append((now, "open" if open_ else "close"))

    @property
    def is_open(self) -> bool:
        return self._open

    def events(self) -> list[str]:
        return [event for _, event in self.timeline]

    @property
    def opens(self) -> int:
        return self.events().count("open")

    def assert_events(self, expected: Iterable[str]) -> None:
        """Fail with the whole timeline unless the events are exactly ``expected``."""
        expected = list(expected)
        assert self.events() == expected, f"gate timeline {self.timeline} != {expected}"

    def assert_never_closed_on_vehicle(self) -> None:
        assert not self.closed_on_vehicle, f"barrier closed on a vehicle: {self.closed_on_vehicle}"


class SimPresence:
    """A vehicle detector whose reading the test sets (``arrive``/``leave``), with a timeline."""

    def __init__(self, clock: Clock | None = None, *, present: bool = False) -> None:
        self._clock = clock or SystemClock()
        self._present = present
        self.timeline: Timeline = []

    @property
    def vehicle_present(self) -> bool:
        return self._present

    @vehicle_present.setter
    def vehicle_present(self, value: bool) -> None:
        if value != self._present:
            self._present = value
            self.timeline.append((self._clock.now(), "arrive" if value else "leave"))

    def arrive(self) -> None:
        self.vehicle_present = True

    def leave(self) -> None:
        self.vehicle_present = False


class SimDisplay:
    """A display that records every text it is asked to show."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self.timeline: Timeline = []

    def show(self, text: str) -> None:
        self.timeline.append((self._clock.now(), text))

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.timeline]

    @property
    def last(self) -> str | None:
        return self.timeline[-1][1] if self.timeline else None


class SimIndicator:
    """Lamps and buzzer that record every signal (``accepted`` / ``denied``)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self.timeline: Timeline = []

    def signal(self, feedback: str) -> None:
        self.timeline.append((self._clock.now(), feedback))

    @property
    def signals(self) -> list[str]:
        return [kind for _, kind in self.timeline]


class ScriptedCamera:
    """Plays queued frames (or raises queued :class:`CameraError`), then returns None.

    Thread-safe: the gateway reads it from a worker thread while the test pushes frames.
    ``repeat`` keeps returning the last frame, as a real camera keeps seeing a held phone.
    """

    def __init__(self, frames: Iterable[Frame | CameraError] = (), *, repeat: bool = False) -> None:
        self._queue: deque[Frame | CameraError] = deque(frames)
        self._repeat = repeat
        self._last: Frame | None = None
        self.reads = 0
        self.closed = False

    def push(self, *items: Frame | CameraError) -> None:
        self._queue.extend(items)

    def push_code(self, text: str) -> None:
        """Queue a marker frame carrying ``text`` (read by :class:`MarkerDecoder`)."""
        self._queue.append(marker_frame(text))

    def clear(self) -> None:
        self._queue.clear()
        self._last = None

    def read(self) -> Frame | None:
        self.reads += 1
        try:
            item = self._queue.popleft()
        except IndexError:
            return self._last if self._repeat else None
        if isinstance(item, CameraError):
            raise item
        self._last = item
        return item

    def close(self) -> None:
        self.closed = True

    @property
    def queued(self) -> int:
        return len(self._queue)


MARKER = b"QRPARK-MARKER:"


def marker_frame(text: str) -> Frame:
    """A tiny frame whose bytes carry ``text`` (a stand-in for a rendered QR code)."""
    data = np.frombuffer(MARKER + text.encode(), dtype=np.uint8)
    return data.reshape(1, -1).copy()


class MarkerDecoder:
    """A Decoder for :func:`marker_frame` frames; any other frame has no code."""

    name = "marker"

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, frame: Frame) -> list[str]:
        self.calls += 1
        raw = frame.tobytes()
        if frame.ndim == 2 and frame.shape[0] == 1 and raw.startswith(MARKER):
            return [raw[len(MARKER) :].decode()]
        return []


@dataclass
class SimDevices:
    """One simulated lane's devices: what the firmware drives (``hardware``), and how the
    simulator and tests look at them: the relay's timeline (``gate``), the world the
    detector senses (``scene``) and the lane's gpiozero ``MockFactory`` (``pins``)."""

    hardware: Hardware
    gate: SimGate
    scene: LaneScene
    pins: Any


def sim_lane_devices(
    settings: GatewaySettings,
    *,
    clock: Clock | None = None,
    scene: LaneScene | None = None,
    camera: Camera | None = None,
    decoder: Decoder | None = None,
) -> SimDevices:
    """Simulated devices for a gateway, the gpiozero ones on mock pins.

    The barrier is the firmware's :class:`~gateway_firmware.hardware.gpio.RelayGate` on
    ``settings.gpio``'s pins (relay, and lamps/buzzer when configured, which then also
    signal the driver; otherwise a :class:`SimIndicator` records the signals), and the
    detector (when ``gpio.presence_pin`` is set) its
    :class:`~gateway_firmware.hardware.gpio.GpioPresence`, whose mock pin follows
    ``scene`` (wired as ``presence_pull_up`` says). All on a fresh ``MockFactory`` for this
    lane, released by ``hardware.close()``.

    With a ``scene`` the camera is a :class:`~sim_devices.camera.SimCamera` rendering the
    scene's code into real frames at ``settings.camera.fps``, decoded by the configured real
    decoder. Without one the lane sees nothing (an empty scene, a :class:`ScriptedCamera`
    with no frames read by a :class:`MarkerDecoder`). Explicit ``camera``/``decoder`` win.
    """
    from gateway_firmware.hardware.gpio import GpioPresence, RelayGate
    from sim_devices.pins import mock_pin_factory
    from sim_devices.scene import LaneScene

    if scene is not None:
        from gateway_firmware.hardware.decoders import make_decoder
        from sim_devices.camera import SimCamera

        camera = camera or SimCamera(scene, frame_interval=1 / settings.camera.fps)
        decode = settings.decode
        decoder = decoder or make_decoder(
            settings.decoder, roi=decode.roi, downscale=decode.downscale
        )
    scene = scene if scene is not None else LaneScene()
    gpio = settings.gpio
    pins = mock_pin_factory()
    releases: list[Callable[[], None]] = []
    try:
        relay = RelayGate(
            gpio.relay_pin,
            active_high=gpio.relay_active_high,
            green_led_pin=gpio.green_led_pin,
            red_led_pin=gpio.red_led_pin,
            buzzer_pin=gpio.buzzer_pin,
            pin_factory=pins,
        )
        releases.append(relay.release)
        presence: GpioPresence | None = None
        if gpio.presence_pin is not None:
            presence = GpioPresence(
                gpio.presence_pin, pull_up=gpio.presence_pull_up, pin_factory=pins
            )
            releases.append(presence.release)
            scene.watch(_loop_contact(pins.pin(gpio.presence_pin), pull_up=gpio.presence_pull_up))
        gate = SimGate.observing(
            relay,
            pins.pin(gpio.relay_pin),
            active_high=gpio.relay_active_high,
            clock=clock,
            presence=presence,
        )
    except Exception:
        for release in reversed(releases):
            release()
        pins.close()
        raise
    lamps = (gpio.green_led_pin, gpio.red_led_pin, gpio.buzzer_pin)
    hardware = Hardware(
        camera=camera or ScriptedCamera(),
        decoder=decoder or MarkerDecoder(),
        gate=relay,
        display=SimDisplay(clock),
        presence=presence,
        indicator=relay if any(pin is not None for pin in lamps) else SimIndicator(clock),
        on_close=[*releases, pins.close],
    )
    return SimDevices(hardware=hardware, gate=gate, scene=scene, pins=pins)


def _loop_contact(pin: Any, *, pull_up: bool) -> Callable[[bool], None]:
    """Drive a detector's mock input pin as its contact would: with ``pull_up`` a vehicle
    pulls the line low, without it a vehicle drives it high."""

    def follow(present: bool) -> None:
        if present == pull_up:
            pin.drive_low()
        else:
            pin.drive_high()

    return follow


def sim_hardware(
    settings: GatewaySettings,
    *,
    clock: Clock | None = None,
    scene: LaneScene | None = None,
    camera: Camera | None = None,
    decoder: Decoder | None = None,
) -> Hardware:
    """``sim_lane_devices(...).hardware``: the devices alone (see :func:`sim_lane_devices`)."""
    return sim_lane_devices(
        settings, clock=clock, scene=scene, camera=camera, decoder=decoder
    ).hardware


def idle_lane_hardware(settings: GatewaySettings) -> Hardware:
    """``qrpark-gateway --hardware sim``: an empty lane seen by a rendering camera at the
    configured fps and decoded by the configured real decoder (what a Pi does while idle),
    with the relay and detector on gpiozero mock pins."""
    from sim_devices.scene import LaneScene

    return sim_hardware(settings, scene=LaneScene(name=f"{settings.lot_id}/{settings.gate_id}"))
