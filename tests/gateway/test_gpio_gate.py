"""The relay gate and detector adapters on gpiozero's mock pins, plus one contract suite that
runs over every Gate implementation (the sim one and the gpiozero one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from gpiozero.pins.mock import MockFactory

from gateway_firmware.hardware.gpio import GpioPresence, RelayGate
from gateway_firmware.hardware.interfaces import Gate, PresenceDetector
from parking_protocol.clock import FakeClock
from sim_devices.devices import SimGate


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    pins = MockFactory()
    yield pins
    pins.close()


def test_relay_gate_drives_the_relay_pin(factory: MockFactory) -> None:
    gate = RelayGate(17, pin_factory=factory)
    relay = factory.pin(17)
    assert relay.state is False  # starts closed
    gate.open()
    assert (relay.state, gate.is_open) == (True, True)
    gate.close()
    assert (relay.state, gate.is_open) == (False, False)
    gate.release()


def test_relay_gate_active_low_and_lamps(factory: MockFactory) -> None:
    gate = RelayGate(17, active_high=False, green_led_pin=22, red_led_pin=27, pin_factory=factory)
    relay, green, red = factory.pin(17), factory.pin(22), factory.pin(27)
    assert (relay.state, green.state, red.state) == (True, False, True)  # closed: relay high
    gate.open()
    assert (relay.state, green.state, red.state) == (False, True, False)
    assert gate.is_open
    gate.close()
    assert (relay.state, green.state, red.state) == (True, False, True)
    gate.release()


def test_relay_records_a_timeline_of_changes(factory: MockFactory) -> None:
    gate = RelayGate(17, pin_factory=factory)
    relay = factory.pin(17)
    relay.clear_states()
    gate.open()
    gate.open()
    gate.close()
    relay.assert_states([False, True, False])
    gate.release()


def test_presence_on_a_pulled_up_dry_contact(factory: MockFactory) -> None:
    detector = GpioPresence(23, pin_factory=factory)
    assert isinstance(detector, PresenceDetector)
    pin = factory.pin(23)
    assert detector.vehicle_present is False
    pin.drive_low()
    assert detector.vehicle_present is True
    pin.drive_high()
    assert detector.vehicle_present is False
    detector.release()


def _sim_gate(_: MockFactory) -> Gate:
    return SimGate(FakeClock())


def _relay_gate(factory: MockFactory) -> Gate:
    return RelayGate(17, pin_factory=factory)


@pytest.mark.parametrize("make", [_sim_gate, _relay_gate], ids=["sim", "gpiozero"])
def test_gate_contract(make: Callable[[MockFactory], Gate], factory: MockFactory) -> None:
    gate = make(factory)
    assert isinstance(gate, Gate)
    assert gate.is_open is False
    gate.open()
    gate.open()  # idempotent
    assert gate.is_open is True
    gate.close()
    gate.close()
    assert gate.is_open is False
