"""What a lane's camera and loop detector see: a simulated vehicle holding up a phone.

A :class:`LaneScene` is the shared world of one lane: the driver-traffic simulator changes
it, the :class:`~sim_devices.camera.SimCamera` renders ``code_in_view`` into frames, and the
scene itself is the lane's :class:`~gateway_firmware.hardware.interfaces.PresenceDetector`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["LaneScene"]


@dataclass
class LaneScene:
    name: str = "lane"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _vehicle: str | None = None
    _code: str | None = None

    # PresenceDetector
    @property
    def vehicle_present(self) -> bool:
        with self._lock:
            return self._vehicle is not None

    # what SimCamera renders
    def code_in_view(self) -> str | None:
        with self._lock:
            return self._code

    def vehicle_arrives(self, vehicle: str) -> None:
        with self._lock:
            self._vehicle = vehicle

    def show_code(self, code: str | None) -> None:
        with self._lock:
            self._code = code

    def vehicle_leaves(self) -> None:
        with self._lock:
            self._vehicle = None
            self._code = None
