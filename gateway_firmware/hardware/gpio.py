"""gpiozero adapters: the barrier relay (with lamps and a buzzer) and a vehicle detector.

gpiozero is imported when an adapter is built, so the rest of the firmware runs where it is
not installed. Pass ``pin_factory=MockFactory()`` to test without a Pi: the mock pins record
their state changes, so a test asserts on what the relay did.

>>> # from gpiozero.pins.mock import MockFactory
>>> # gate = RelayGate(17, pin_factory=MockFactory())
>>> # gate.open(); gate.is_open
>>> # True
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

__all__ = ["GpioPresence", "RelayGate"]

Pin = int | str


class RelayGate:
    """The barrier through a relay: energised = open. Idempotent ``open``/``close``.

    The relay starts de-energised (closed). ``release`` frees the pins (it does not move the
    barrier; ``close`` does). The optional lamps follow the barrier (green open, red
    closed); :meth:`signal` is the lane's :class:`~gateway_firmware.hardware.interfaces.Indicator`:
    one short beep when a code is accepted; on a denial the red lamp flashes three times
    and the buzzer beeps twice (both in gpiozero's background threads).
    """

    FLASH_S = 0.15
    BEEP_S = 0.08

    def __init__(
        self,
        relay_pin: Pin,
        *,
        active_high: bool = True,
        green_led_pin: Pin | None = None,
        red_led_pin: Pin | None = None,
        buzzer_pin: Pin | None = None,
        pin_factory: Any = None,
    ) -> None:
        from gpiozero import LED, Buzzer, OutputDevice

        self._relay = OutputDevice(
            relay_pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
        )
        self._green = (
            LED(green_led_pin, pin_factory=pin_factory) if green_led_pin is not None else None
        )
        self._red = (
            LED(red_led_pin, initial_value=True, pin_factory=pin_factory)
            if red_led_pin is not None
            else None
        )
        self._buzzer = (
            Buzzer(buzzer_pin, pin_factory=pin_factory) if buzzer_pin is not None else None
        )
        self._restore: threading.Timer | None = None

    def open(self) -> None:
        self._relay.on()
        self._lamps(open_=True)

    def close(self) -> None:
        self._relay.off()
        self._lamps(open_=False)

    @property
    def is_open(self) -> bool:
        return bool(self._relay.value)

    def signal(self, feedback: str) -> None:
        denied = feedback == "denied"
        if self._buzzer is not None:
            self._buzzer.beep(self.BEEP_S, self.BEEP_S, n=2 if denied else 1, background=True)
        if denied and self._red is not None:
            self._red.blink(self.FLASH_S, self.FLASH_S, n=3, background=True)
            if self._restore is not None:
                self._restore.cancel()
            # After the flashes, the red lamp shows the barrier's state again.
            self._restore = threading.Timer(6 * self.FLASH_S + 0.05, self._settle)
            self._restore.daemon = True
            self._restore.start()

    def _settle(self) -> None:
        with contextlib.suppress(Exception):  # released meanwhile
            self._lamps(open_=self.is_open)

    def _lamps(self, *, open_: bool) -> None:
        if self._green is not None:
            self._green.value = open_
        if self._red is not None:
            self._red.value = not open_

    def release(self) -> None:
        if self._restore is not None:
            self._restore.cancel()
        for device in (self._relay, self._green, self._red, self._buzzer):
            if device is not None:
                device.close()


class GpioPresence:
    """A vehicle detector's output (induction loop or light beam) on a GPIO input.

    ``pull_up=True`` (the usual loop-detector wiring: a dry contact closing to ground) means a
    vehicle pulls the pin low; ``pull_up=False`` means a vehicle drives it high.
    """

    def __init__(self, pin: Pin, *, pull_up: bool = True, pin_factory: Any = None) -> None:
        from gpiozero import DigitalInputDevice

        self._input = DigitalInputDevice(pin, pull_up=pull_up, pin_factory=pin_factory)

    @property
    def vehicle_present(self) -> bool:
        return bool(self._input.is_active)

    def release(self) -> None:
        self._input.close()
