"""A real browser (Debian's Chromium through Playwright) against the real service.

The app is served by uvicorn on a free port in a background thread and talks MQTT, with the
transport it builds from its settings, to the session's private Mosquitto. The ``lot``
fixture adds lot ``demo``'s entry and exit lanes: the real gateway firmware on simulated
devices, on a loop of their own, reaching the service only through that broker.
No browser is ever downloaded: without /usr/bin/chromium (or the playwright package) the
tests skip, or fail when ``QRPARK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    ADMIN_PASSWORD,
    DRIVER_PIN,
    VIEWER_PASSWORD,
    LiveService,
    LoopThread,
    SimLot,
    wait_until,
)
from service_guard import missing_service

from parking_protocol.clock import SystemClock
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import public_key_text
from parking_protocol.topics import TopicKind, denylist_topic, gate_topic
from parking_protocol.types import Direction
from qrpark.services import MosquittoProcess, free_port
from server.accounts.models import AccountCreate
from server.auth import service as auth
from server.auth.models import Role
from server.central import Central
from server.config import ServerSettings
from server.gateways import service as gateways
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.main import create_app
from sim_devices.lot import SimLaneConfig, start_sim_lane

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GATES = {"demo": ("in1", "out1"), "north": ("in1",)}
# Retained on the broker, which outlives a test: cleared before and after each one.
RETAINED = [
    *(gate_topic(lot, gate, TopicKind.STATUS) for lot, gates in GATES.items() for gate in gates),
    *(denylist_topic(lot) for lot in GATES),
]


async def _clear_retained(broker_url: str) -> None:
    client = MqttTransport(parse_broker_url(broker_url), f"browser-clean-{uuid.uuid4().hex[:8]}")
    await client.start()
    try:
        if not await client.wait_connected(10):
            raise RuntimeError(f"cannot reach the broker at {broker_url}")
        for topic in RETAINED:
            await client.publish(topic, b"", retain=True)
    finally:
        await client.close()


@pytest.fixture
def service_overrides() -> dict[str, Any]:
    """Extra ``ServerSettings`` fields; a test parametrizes this to change one."""
    return {}


@pytest.fixture
def live(
    tmp_path: Path, mosquitto: MosquittoProcess, service_overrides: dict[str, Any]
) -> Iterator[LiveService]:
    import uvicorn

    asyncio.run(_clear_retained(mosquitto.url))
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path / 'qrpark.db'}",
        key_file=tmp_path / "keys" / "signing.pem",
        admin_password=ADMIN_PASSWORD,
        demo_driver_pin=DRIVER_PIN,
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"central-browser-{uuid.uuid4().hex[:8]}",
        **service_overrides,
    )
    loop = asyncio.new_event_loop()
    app = create_app(settings)  # its MQTT transport comes from the settings
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(server.serve()), name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the service did not start")
        time.sleep(0.02)
    central: Central = app.state.central
    service = LiveService(f"http://127.0.0.1:{port}", central, loop)
    try:
        assert central.transport is not None, "the service built no MQTT transport"
        assert service.run(central.transport.wait_connected(10)), "the service did not connect"
        tariff = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=6000)
        central.create_lot(LotCreate(lot_id="demo", name="Demo Plaza", capacity=40, tariff=tariff))
        central.create_lot(
            LotCreate(lot_id="north", name="North Garage", capacity=2, tariff=tariff)
        )
        central.create_gate(
            "demo", GateCreate(gate_id="in1", direction=Direction.ENTRY, name="North entry")
        )
        central.create_gate(
            "demo", GateCreate(gate_id="out1", direction=Direction.EXIT, name="North exit")
        )
        central.create_gate("north", GateCreate(gate_id="in1", direction=Direction.ENTRY))
        central.create_account(AccountCreate(account_id="alice", name="Alice Liddell"))
        central.topup("alice", 20_000, idempotency_key="seed")
        with central.db() as db:
            auth.create_user(
                db,
                username="vera",
                password=VIEWER_PASSWORD,
                role=Role.VIEWER,
                now=central.clock.now(),
            )
        yield service
    finally:
        server.should_exit = True
        thread.join(15)
        loop.close()
        asyncio.run(_clear_retained(mosquitto.url))


@pytest.fixture
def lot(live: LiveService, mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[SimLot]:
    """Lot ``demo``'s lanes ``in1`` (entry) and ``out1`` (exit), online at the service."""
    central = live.central
    keys = {kid: public_key_text(key) for kid, key in central.keys.public_keys().items()}
    clock = SystemClock()

    def config(gate_id: str, direction: Direction) -> SimLaneConfig:
        return SimLaneConfig(
            lot_id="demo",
            gate_id=gate_id,
            direction=direction,
            broker_url=mosquitto.url,
            public_keys=keys,
            data_dir=tmp_path / "gateways" / gate_id,
            fps=20,
            seed=1,
        )

    thread = LoopThread("sim-lot")
    lanes = []
    try:
        for gate_id, direction in (("in1", Direction.ENTRY), ("out1", Direction.EXIT)):
            lane = thread.run(start_sim_lane(config(gate_id, direction), clock))
            lanes.append(lane)
            assert thread.run(lane.gateway.uplink.transport.wait_connected(10)), gate_id

        def online() -> bool:
            with central.db() as db:
                gates = [gateways.gate_read(db, gate) for gate in gateways.list_gates(db, "demo")]
            return all(gate.status is not None and gate.status.online for gate in gates)

        wait_until(online, "lot demo's gateways online at the service")
        entry, exit_ = lanes
        yield SimLot(live, thread, clock, entry, exit_)
    finally:
        for lane in lanes:
            thread.run(lane.stop())
        thread.close()


@pytest.fixture
def chromium() -> Iterator[Any]:
    """A headless Chromium from the OS (never downloaded)."""
    if not CHROMIUM.exists():
        missing_service("Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()
