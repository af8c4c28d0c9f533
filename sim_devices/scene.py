"""What a lane's camera and loop detector see: a simulated vehicle holding up a phone.

A :class:`LaneScene` is the shared world of one lane: the driver-traffic simulator changes
it, the :class:`~sim_devices.camera.SimCamera` renders ``code_in_view`` into frames, and the
loop detector follows ``vehicle_present``: :func:`~sim_devices.devices.sim_lane_devices`
watches the scene (:meth:`~LaneScene.watch`) and drives the detector's gpiozero mock pin,
which the firmware's real :class:`~gateway_firmware.hardware.gpio.GpioPresence` reads.
(The scene is also a :class:`~gateway_firmware.hardware.interfaces.PresenceDetector`
itself, for the deterministic simulation that needs no pins.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LaneScene"]


@dataclass
class LaneScene:
    name: str = "lane"
    # Re-entrant: watchers run under it (so the detector pin changes in the scene's order)
    # and may read the scene.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _vehicle: str | None = None
    _code: str | None = None
    _watchers: list[Callable[[bool], None]] = field(default_factory=list, repr=False)

    # PresenceDetector
    @property
    def vehicle_present(self) -> bool:
        with self._lock:
            return self._vehicle is not None

    # what SimCamera renders
    def code_in_view(self) -> str | None:
        with self._lock:
            return self._code

    def watch(self, on_presence: Callable[[bool], None]) -> None:
        """Call ``on_presence(present)`` now and whenever a vehicle arrives or leaves."""
        with self._lock:
            self._watchers.append(on_presence)
            on_presence(self._vehicle is not None)

    def vehicle_arrives(self, vehicle: str) -> None:
        with self._lock:
            was_present = self._vehicle is not None
            self._vehicle = vehicle
            if not was_present:
                self._notify(True)

    def show_code(self, code: str | None) -> None:
        with self._lock:
            self._code = code

    def vehicle_leaves(self) -> None:
        with self._lock:
            was_present = self._vehicle is not None
            self._vehicle = None
            self._code = None
            if was_present:
                self._notify(False)

    def _notify(self, present: bool) -> None:
        for on_presence in list(self._watchers):
            on_presence(present)
