"""Fixtures for the gateway tests: keys, a FakeClock, settings, and a running gateway harness."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gw_support import GATE, LOT, FakeServer, Harness

from gateway_firmware.app import Hardware, Tuning, build_gateway
from gateway_firmware.config import GatewaySettings
from gateway_firmware.uplink.link import status_will
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import FakeClock
from parking_protocol.qr_token import issue_code, public_key_text
from parking_protocol.transport import InMemoryBroker
from sim_devices.devices import (
    MarkerDecoder,
    ScriptedCamera,
    SimDisplay,
    SimGate,
    SimIndicator,
    SimPresence,
)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issue(signing_key: Ed25519PrivateKey, clock: FakeClock) -> Callable[..., str]:
    """A fresh code for ``account`` valid from the fake clock's now."""

    def _issue(account: str = "alice", **kwargs: Any) -> str:
        kwargs.setdefault("now", clock.now())
        return issue_code(signing_key, kid="k1", account_id=account, **kwargs)

    return _issue


@pytest.fixture
def make_settings(signing_key: Ed25519PrivateKey, tmp_path: Path) -> Callable[..., GatewaySettings]:
    def _make(**overrides: Any) -> GatewaySettings:
        values: dict[str, Any] = {
            "lot_id": LOT,
            "gate_id": GATE,
            "direction": "entry",
            "hardware": "sim",
            "public_keys": {"k1": public_key_text(signing_key.public_key())},
            "outbox_path": tmp_path / "outbox.db",
            "heartbeat_s": 3600,
        }
        values.update(overrides)
        return GatewaySettings(**values)

    return _make


@pytest.fixture
async def harness_factory(
    make_settings: Callable[..., GatewaySettings], clock: FakeClock
) -> AsyncIterator[Callable[..., Any]]:
    """Build (and on teardown stop) gateways sharing one broker, server and clock."""
    broker = InMemoryBroker()
    server = FakeServer(broker, clock)
    await server.start()
    built: list[Harness] = []

    async def _build(*, presence: bool = False, **settings_overrides: Any) -> Harness:
        if presence:
            settings_overrides.setdefault("gpio", {"presence_pin": 23})
        settings = make_settings(**settings_overrides)
        detector = SimPresence(clock) if presence else None
        camera = ScriptedCamera()
        gate = SimGate(clock, presence=detector)
        display = SimDisplay(clock)
        hardware = Hardware(
            camera=camera,
            decoder=MarkerDecoder(),
            gate=gate,
            display=display,
            presence=detector,
            indicator=SimIndicator(clock),
        )
        outbox = Outbox(settings.outbox_file)
        transport = broker.client(
            settings.client_id, will=status_will(settings, outbox.boot, now=clock.now())
        )
        gateway = build_gateway(
            settings,
            hardware=hardware,
            transport=transport,
            clock=clock,
            outbox=outbox,
            tuning=Tuning(tick_s=0.005, idle_sleep_s=0.002, camera_backoff_initial_s=0.01),
        )
        harness = Harness(gateway, broker, server, clock, camera, gate, display, detector, settings)
        built.append(harness)
        await harness.start()
        return harness

    yield _build
    for harness in built:
        with contextlib.suppress(Exception):
            await harness.stop()
        harness.gateway.close()
    await server.stop()


@pytest.fixture
async def harness(harness_factory: Callable[..., Any]) -> Harness:
    """A running entry gateway without a presence detector."""
    built: Harness = await harness_factory()
    return built
