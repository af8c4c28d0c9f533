"""The operator panel and the driver page in a real Chromium, against the running service."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from browser_support import ADMIN_PASSWORD, DRIVER_PIN, VIEWER_PASSWORD, LiveService, keep

from parking_protocol.messages import (
    GateCommand,
    GatewayState,
    GatewayStatus,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import verify_code
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.types import Direction

pytestmark = pytest.mark.slow  # TODO(lead): register and use a `browser` marker

LAPTOP = {"width": 1366, "height": 900}
TABLET = {"width": 820, "height": 1180}
PHONE = {"width": 390, "height": 844}


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def sign_in(
    page: Any, live: LiveService, user: str = "admin", password: str = ADMIN_PASSWORD
) -> None:
    page.goto(live.url + "/panel/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/panel/dashboard")


async def gateway_says(live: LiveService, gate_id: str, message: ScanEvent | GatewayStatus) -> None:
    client = live.broker.client(f"gw-demo-{gate_id}-{new_id()[:8]}")
    await client.start()
    kind = TopicKind.EVENTS if isinstance(message, ScanEvent) else TopicKind.STATUS
    await client.publish(
        gate_topic("demo", gate_id, kind), encode(message), retain=kind == TopicKind.STATUS
    )
    await client.close()


def scan(live: LiveService, gate_id: str, direction: Direction, code: str) -> None:
    event = ScanEvent(
        event_id=new_id(),
        lot_id="demo",
        gate_id=gate_id,
        seq=0,
        boot=1,
        direction=direction,
        code=code,
        scanned_at=live.central.clock.now(),
    )
    live.run(gateway_says(live, gate_id, event))


def online(live: LiveService, gate_id: str, direction: Direction) -> None:
    status = GatewayStatus(
        status_id=new_id(),
        lot_id="demo",
        gate_id=gate_id,
        state=GatewayState.ONLINE,
        direction=direction,
        firmware_version="qrpark-gw 0.1.0",
        boot=3,
        sent_at=live.central.clock.now(),
    )
    live.run(gateway_says(live, gate_id, status))


def test_a_car_entering_appears_live_on_the_dashboard(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    page = chromium.new_page(viewport=LAPTOP)
    sign_in(page, live)
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live", timeout=10_000)
    expect(page.locator("#feed-empty")).to_be_visible()

    online(live, "in1", Direction.ENTRY)
    online(live, "out1", Direction.EXIT)
    scan(live, "in1", Direction.ENTRY, live.central.issue_code("alice").code)
    scan(live, "in1", Direction.ENTRY, live.central.sign_code("mallory").code)

    entry = page.locator("#feed li.event-entry").first
    expect(entry).to_contain_text("alice", timeout=10_000)
    expect(entry).to_contain_text("demo/in1")
    denied = page.locator("#feed li.event-denied").first
    expect(denied).to_contain_text("account_unknown")
    lot = page.locator('[data-lot="demo"]')
    expect(lot.locator('[data-field="used"]')).to_have_text("1", timeout=10_000)
    expect(lot.locator('[data-gate="demo/in1"] [data-gate-state]')).to_have_text("online")
    page.wait_for_timeout(400)
    shot = tmp_path / "dashboard-laptop.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    page.set_viewport_size(TABLET)
    page.reload()
    expect(page.locator("#feed li.event-entry").first).to_contain_text("alice")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the dashboard scrolls sideways on a tablet"
    shot = tmp_path / "dashboard-tablet.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)


def test_operator_opens_a_gate_and_finds_it_in_the_audit_log(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    async def listen() -> Any:
        gateway = live.broker.client("gw-demo-out1")
        await gateway.start()
        await gateway.subscribe(gate_topic("demo", "out1", TopicKind.COMMANDS))
        return aiter(gateway.messages())

    messages = live.run(listen())
    page = chromium.new_page(viewport=LAPTOP)
    sign_in(page, live)
    page.click("nav >> text=Gates")
    page.click("text=North exit")
    page.fill("#open-form input[name=reason]", "Driver paid cash at the booth")
    page.click("#open-form button[type=submit]")

    expect(page.locator(".notice.ok")).to_contain_text("Open sent to demo/out1")
    expect(page.locator("#manual-opens")).to_contain_text("Driver paid cash at the booth")
    command = decode(live.run(asyncio.wait_for(anext(messages), 5)).payload)
    assert isinstance(command, GateCommand)
    assert (command.event_id, command.reason.value) == (None, "manual_open")
    page.click("nav >> text=Audit log")
    row = page.locator("table.audit tbody tr", has_text="gate.manual_open").first
    expect(row).to_contain_text("user:admin")
    expect(row).to_contain_text("Driver paid cash at the booth")
    expect(row).to_contain_text("demo/out1")
    shot = tmp_path / "audit.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)


def test_a_viewer_sees_gates_but_no_open_button(live: LiveService, chromium: Any) -> None:
    page = chromium.new_page(viewport=TABLET)
    sign_in(page, live, "vera", VIEWER_PASSWORD)

    page.goto(live.url + "/panel/gates/demo/in1")

    expect(page.locator("#open-form")).to_have_count(0)
    expect(page.locator("main")).to_contain_text("can watch gates but not open them")
    expect(page.locator("nav >> text=Users")).to_have_count(0)


def test_the_gateway_decoder_reads_the_code_on_the_driver_page(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    import cv2

    from gateway_firmware.hardware.decoders import make_decoder

    page = chromium.new_page(viewport=PHONE)
    page.goto(live.url + "/driver/login")
    page.fill("input[name=account_id]", "alice")
    page.fill("input[name=pin]", DRIVER_PIN)
    page.click("button[type=submit]")
    page.wait_for_url("**/driver")
    expect(page.locator('#qr[data-ready="1"]')).to_have_count(1, timeout=10_000)
    expect(page.locator("#countdown")).to_contain_text("New code in")
    expect(page.locator("#balance")).to_have_text("¥200.00")

    png = page.screenshot(path=str(tmp_path / "driver.png"))
    keep(tmp_path / "driver.png")
    frame = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    texts = make_decoder("zxing").decode(frame)

    assert len(texts) == 1
    claims = verify_code(texts[0], live.central.keys.public_keys(), now=live.central.clock.now())
    assert claims.account_id == "alice"

    page.click("button[data-topup='2000']")
    expect(page.locator("#balance")).to_have_text("¥220.00", timeout=10_000)


def test_the_event_stream_speaks_server_sent_events(live: LiveService) -> None:
    with httpx.Client(base_url=live.url, timeout=10) as http:
        login = http.get("/panel/login")
        token = login.text.split('name="csrf_token" value="')[1].split('"')[0]
        signed = http.post(
            "/panel/login",
            data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token},
        )
        assert signed.status_code == 303
        with http.stream("GET", "/panel/api/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == "retry: 2000"
            scan(live, "in1", Direction.ENTRY, live.central.issue_code("alice").code)
            data = next(line for line in lines if line.startswith("data: "))
    event = json.loads(data.removeprefix("data: "))
    assert (event["kind"], event["account_id"], event["gate_id"]) == ("entry", "alice", "in1")


def test_admin_previews_a_price_then_creates_a_tariff_version(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    page = chromium.new_page(viewport=TABLET)
    sign_in(page, live)
    page.click("nav >> text=Tariffs")
    page.select_option("select[name=lot]", "north")
    page.click("text=Show")
    page.fill("input[name=increment]", "4.00")
    page.select_option("select[name=increment_minutes]", "30")
    page.fill("input[name=grace_minutes]", "0")
    page.fill("input[name=entry_at]", "2030-01-07T09:00")
    page.fill("input[name=exit_at]", "2030-01-07T10:10")
    page.click("#preview-button")

    expect(page.locator("#quote")).to_contain_text("would cost ¥12.00")  # 3 started half hours

    page.fill("input[name=effective_from]", "2030-01-01T00:00")
    page.fill("input[name=note]", "Winter rates")
    page.click("#create-button")

    expect(page.locator(".notice.ok")).to_contain_text("Version 2 of North Garage")
    row = page.locator("#versions tbody tr").first
    expect(row).to_contain_text("v2")
    expect(row).to_contain_text("scheduled")
    expect(row).to_contain_text("Winter rates")
    shot = tmp_path / "tariffs.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)


def closed_stay(live: LiveService, account_id: str) -> str:
    """Drive in and out at the demo lot; returns the closed session's id."""
    scan(live, "in1", Direction.ENTRY, live.central.issue_code(account_id).code)
    scan(live, "out1", Direction.EXIT, live.central.issue_code(account_id).code)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = live.central.list_sessions(account_id=account_id, lot_id="demo")
        if found and found[0].state == "closed":
            return found[0].session_id
        time.sleep(0.05)
    raise AssertionError(f"{account_id}'s stay did not close")


def test_operator_sees_revenue_and_refunds_a_stay_from_the_money_page(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    session_id = closed_stay(live, "alice")  # grace 0, ¥5.00 an hour started
    page = chromium.new_page(viewport=LAPTOP)
    sign_in(page, live)
    page.click("nav >> text=Money")

    expect(page.locator("#chart-days-CNY svg rect.bar")).to_have_count(1)
    expect(page.locator("#chart-lots-CNY")).to_contain_text("Demo Plaza")
    expect(page.locator("#net-CNY")).to_have_text("¥5.00")
    expect(page.locator('#lot-totals-CNY tr[data-lot="demo"]')).to_contain_text("¥5.00")
    shot = tmp_path / "money-laptop.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    row = page.locator("#payments tbody tr", has_text=session_id[:10])
    row.locator("summary", has_text="Refund").click()
    row.locator("input[name=amount]").fill("2.00")
    row.locator("input[name=reason]").fill("Ticket machine charged twice")
    row.locator("button[type=submit]").click()

    expect(page.locator(".notice.ok")).to_contain_text("¥2.00 refunded")
    refund = page.locator("#refunds tbody tr").first
    expect(refund).to_contain_text("Ticket machine charged twice")
    expect(refund).to_contain_text("user:admin")
    expect(refund).to_contain_text("¥2.00")
    expect(page.locator("#net-CNY")).to_have_text("¥3.00")
    expect(page.locator("#refunded-CNY")).to_have_text("¥2.00")

    page.set_viewport_size(TABLET)
    page.reload()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the money page scrolls sideways on a tablet"
    button = page.locator("#payments summary", has_text="Refund").bounding_box()
    assert button is not None and button["x"] + button["width"] <= TABLET["width"], (
        "the refund button is cut off on a tablet"
    )
    shot = tmp_path / "money-tablet.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    page.click("nav >> text=Audit log")
    logged = page.locator("table.audit tbody tr", has_text="payment.refund").first
    expect(logged).to_contain_text("user:admin")
    expect(logged).to_contain_text("Ticket machine charged twice")
    expect(logged).to_contain_text(session_id)
    page.goto(f"{live.url}/panel/sessions/{session_id}")
    expect(page.locator("#payment-method")).to_have_text("wallet")
    expect(page.locator("#receipt-link")).to_have_attribute("href", f"/receipts/{session_id}")
    shot = tmp_path / "session-receipt.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)
