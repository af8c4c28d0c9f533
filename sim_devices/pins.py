"""gpiozero's mock pins for the simulator: one MockFactory per simulated Pi, chosen explicitly.

The simulator runs the firmware's real gpiozero adapters
(:class:`~gateway_firmware.hardware.gpio.RelayGate`,
:class:`~gateway_firmware.hardware.gpio.GpioPresence`) on these pins, never on whatever pin
factory gpiozero would fall back to. An :class:`ObservedPin` is a gpiozero ``MockPin`` that
also tells listeners about each change of its level, so a timeline can watch the relay::

    >>> pins = mock_pin_factory()
    >>> relay = pins.pin(17)
    >>> relay.listeners.append(lambda level: print("relay", level))
    >>> relay.function = "output"
    >>> relay.state = True
    relay True
    >>> pins.close()

A factory reserves its pins, so every simulated lane gets its own (as every Pi has its own
header); one costs about 1 ms and 50 kB with a relay and a detector (docs/gateway.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin

__all__ = ["ObservedPin", "mock_pin_factory"]


class ObservedPin(MockPin):  # type: ignore[misc]  # gpiozero is untyped
    """A mock pin that calls ``listeners`` with the new level on every change.

    Listeners run in the thread that changed the pin (the one that called
    ``relay.on()`` or ``drive_low()``), after the pin's own state and ``states`` record.
    """

    def __init__(self, factory: Any, info: Any) -> None:
        self.listeners: list[Callable[[bool], None]] = []
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed:
            for listener in list(self.listeners):
                listener(bool(value))
        return changed


def mock_pin_factory() -> Any:
    """A fresh gpiozero ``MockFactory`` whose pins are :class:`ObservedPin` (one per lane)."""
    return MockFactory(pin_class=ObservedPin)
