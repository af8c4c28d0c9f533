"""A real browser (Debian's Chromium through Playwright) against the real service.

The app is served by uvicorn on a free port in a background thread, with an in-memory MQTT
broker on the server's own event loop; tests publish gateway messages into that loop.
No browser is ever downloaded: without /usr/bin/chromium (or the playwright package) the
tests skip, or fail when ``QRPARK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from browser_support import ADMIN_PASSWORD, DRIVER_PIN, VIEWER_PASSWORD, LiveService
from service_guard import missing_service

from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.accounts.models import AccountCreate
from server.auth import service as auth
from server.auth.models import Role
from server.central import Central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.main import create_app

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
T = TypeVar("T")



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveService]:
    import uvicorn

    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path / 'qrpark.db'}",
        key_file=tmp_path / "keys" / "signing.pem",
        admin_password=ADMIN_PASSWORD,
        demo_driver_pin=DRIVER_PIN,
    )
    broker = InMemoryBroker()
    loop = asyncio.new_event_loop()
    app = create_app(settings, transport=broker.client("central"))
    port = _free_port()
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
    tariff = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=6000)
    central.create_lot(LotCreate(lot_id="demo", name="Demo Plaza", capacity=40, tariff=tariff))
    central.create_lot(LotCreate(lot_id="north", name="North Garage", capacity=2, tariff=tariff))
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
            db, username="vera", password=VIEWER_PASSWORD, role=Role.VIEWER, now=central.clock.now()
        )
    try:
        yield LiveService(f"http://127.0.0.1:{port}", central, broker, loop)
    finally:
        server.should_exit = True
        thread.join(15)
        loop.close()


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
