"""gpiozero adapters: the barrier relay (with optional green/red lamps) and a vehicle detector.

gpiozero is imported when an adapter is built, so the rest of the firmware runs where it is
not installed. Pass ``pin_factory=MockFactory()`` to test without a Pi: the mock pins record
their state changes, so a test asserts on what the relay did.

>>> # from gpiozero.pins.mock import MockFactory
>>> # gate = RelayGate(17, pin_factory=MockFactory())
>>> # gate.open(); gate.is_open
>>> # True
"""

from __future__ import annotations

from typing import Any

__all__ = ["GpioPresence", "RelayGate"]

Pin = int | str


class RelayGate:
    """The barrier through a relay: energised = open. Idempotent ``open``/``close``.

    The relay starts de-energised (closed). ``release`` frees the pins (it does not move the
    barrier; ``close`` does).
    """

    def __init__(
        self,
        relay_pin: Pin,
        *,
        active_high: bool = True,
        green_led_pin: Pin | None = None,
        red_led_pin: Pin | None = None,
        pin_factory: Any = None,
    ) -> None:
        from gpiozero import LED, OutputDevice

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

    def open(self) -> None:
        self._relay.on()
        self._lamps(open_=True)

    def close(self) -> None:
        self._relay.off()
        self._lamps(open_=False)

    @property
    def is_open(self) -> bool:
        return bool(self._relay.value)

    def _lamps(self, *, open_: bool) -> None:
        if self._green is not None:
            self._green.value = open_
        if self._red is not None:
            self._red.value = not open_

    def release(self) -> None:
        for device in (self._relay, self._green, self._red):
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
