"""The hardware a lane controller talks to, as tiny interfaces.

Each interface has real adapters (OpenCV camera, zxing-cpp/pyzbar/OpenCV decoders, a
gpiozero relay) and simulated implementations in ``sim_devices`` that the simulator and the
tests run. Nothing in ``gateway_firmware.core`` touches hardware: the app feeds it readings.

A third party porting the firmware to other hardware implements these::

    class MyGate:
        def open(self) -> None: relay.on()
        def close(self) -> None: relay.off()
        @property
        def is_open(self) -> bool: return relay.value == 1
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AsyncCamera",
    "Camera",
    "CameraError",
    "Decoder",
    "Display",
    "Frame",
    "Gate",
    "Indicator",
    "PresenceDetector",
]

# A camera frame: uint8, either grayscale (H, W) or BGR (H, W, 3) as OpenCV delivers it.
Frame = npt.NDArray[np.uint8]


class CameraError(RuntimeError):
    """The camera failed (unplugged, driver error); the app reports it and retries."""


@runtime_checkable
class Camera(Protocol):
    """A source of frames.

    ``read`` blocks for at most about one frame interval and returns the newest frame, or
    ``None`` when none is ready; it raises :class:`CameraError` when the device fails.
    """

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncCamera(Protocol):
    """A camera that can wait for its next frame without blocking a thread (simulators).

    The scan loop prefers ``await read_async()`` over ``read()`` in a worker thread when a
    camera has it: a thousand simulated lanes then cost a thousand sleeping coroutines, not
    a thread pool full of sleeping threads. Returning the *same* array object as the last
    read means "nothing changed": the loop skips decoding it again.

    ``read_async`` waits (awaits) on every call, until the next frame is due, before it
    returns, also when nothing changed: the scan loop yields to the event loop only there.
    """

    async def read_async(self) -> Frame | None: ...

    def close(self) -> None: ...


@runtime_checkable
class Decoder(Protocol):
    """Finds QR codes in a frame and returns their texts (empty list when there are none).

    >>> class Fixed:
    ...     name = "fixed"
    ...     def decode(self, frame: Frame) -> list[str]: return ["QP1..."]
    """

    name: str

    def decode(self, frame: Frame) -> list[str]: ...


@runtime_checkable
class Gate(Protocol):
    """The barrier (through a relay). ``open``/``close`` are idempotent."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    @property
    def is_open(self) -> bool: ...


@runtime_checkable
class PresenceDetector(Protocol):
    """An induction loop or beam: is a vehicle in the lane (under the barrier)?"""

    @property
    def vehicle_present(self) -> bool: ...


@runtime_checkable
class Display(Protocol):
    """The text display a driver reads at the barrier."""

    def show(self, text: str) -> None: ...


@runtime_checkable
class Indicator(Protocol):
    """Lamps and a buzzer: ``signal("accepted")`` or ``signal("denied")`` with a decision.

    >>> class Beeper:
    ...     def signal(self, feedback: str) -> None: print("beep" if feedback == "denied" else "")
    """

    def signal(self, feedback: str) -> None: ...
