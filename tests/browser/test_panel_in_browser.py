"""The operator panel and the driver page in a real Chromium, against the running service."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from browser_support import (
    ADMIN_PASSWORD,
    DRIVER_PIN,
    VIEWER_PASSWORD,
    LiveService,
    SimLot,
    keep,
    wait_until,
)

from parking_protocol.qr_token import CodeClaims, verify_code
from parking_protocol.types import DENY_TEXT, Reason
from server.panel.templating import short_id

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]

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


def driver_sign_in(page: Any, live: LiveService, account_id: str = "alice") -> None:
    page.goto(live.url + "/driver/login")
    page.fill("input[name=account_id]", account_id)
    page.fill("input[name=pin]", DRIVER_PIN)
    page.click("button[type=submit]")
    page.wait_for_url("**/driver")
    expect(page.locator('#qr[data-ready="1"]')).to_have_count(1, timeout=10_000)


def code_on_screen(page: Any, shot: Path) -> str:
    """The one code the gateway's decoder reads from a screenshot of the page."""
    import cv2

    from gateway_firmware.hardware.decoders import make_decoder

    png = page.screenshot(path=str(shot))
    keep(shot)
    frame = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    texts = make_decoder("zxing").decode(frame)
    assert len(texts) == 1, f"the decoder read {texts!r} from {shot.name}"
    return str(texts[0])


def valid_for(live: LiveService, code: str, *, at: Any = None) -> CodeClaims:
    """The code's claims, verified with the service's keys and no clock skew allowed."""
    now = at or live.central.clock.now()
    return verify_code(code, live.central.keys.public_keys(), now=now, skew=timedelta(0))


def test_a_car_entering_appears_live_on_the_dashboard(
    live: LiveService, lot: SimLot, chromium: Any, tmp_path: Path
) -> None:
    page = chromium.new_page(viewport=LAPTOP)
    sign_in(page, live)
    expect(page.locator("#live-state")).to_have_attribute("data-state", "live", timeout=10_000)
    expect(page.locator("#feed-empty")).to_be_visible()

    entered = lot.drive(lot.entry, lot.driver("alice"))
    refused = lot.drive(lot.entry, lot.driver("mallory", registered=False))

    assert entered.opened, entered
    assert (refused.opened, refused.refused) == (False, True), refused
    lot.entry.gate.assert_events(["open", "close"])  # alice only; mallory stayed outside
    entry = page.locator("#feed li.event-entry").first
    expect(entry).to_contain_text("alice", timeout=10_000)
    expect(entry).to_contain_text("demo/in1")
    denied = page.locator("#feed li.event-denied").first
    expect(denied).to_contain_text("account_unknown")
    card = page.locator('[data-lot="demo"]')
    expect(card.locator('[data-field="used"]')).to_have_text("1", timeout=10_000)
    expect(card.locator('[data-gate="demo/in1"] [data-gate-state]')).to_have_text("online")
    expect(card.locator('[data-gate="demo/out1"] [data-gate-state]')).to_have_text("online")
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
    live: LiveService, lot: SimLot, chromium: Any, tmp_path: Path
) -> None:
    page = chromium.new_page(viewport=LAPTOP)
    sign_in(page, live)
    page.click("nav >> text=Gates")
    page.click("text=North exit")
    page.fill("#open-form input[name=reason]", "Driver paid cash at the booth")
    assert lot.exit.gate.events() == []
    page.click("#open-form button[type=submit]")

    expect(page.locator(".notice.ok")).to_contain_text("Open sent to demo/out1")
    expect(page.locator("#manual-opens")).to_contain_text("Driver paid cash at the booth")
    # The command went over Mosquitto to the exit gateway, which raised its barrier ...
    wait_until(lambda: lot.exit.gate.opens == 1, "the exit barrier opened")
    assert lot.exit.gate.events()[0] == "open"
    assert DENY_TEXT[Reason.MANUAL_OPEN] in lot.exit.display.texts
    lot.entry.gate.assert_events([])

    # ... and its reply came back the same way: the gate page shows it accepted.
    def accepted() -> bool:
        page.reload()
        return "accepted" in page.locator("#manual-opens tbody tr").first.inner_text()

    wait_until(accepted, "the gateway's accepted reply on the gate page")
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
    page = chromium.new_page(viewport=PHONE)
    driver_sign_in(page, live)
    expect(page.locator("#countdown")).to_contain_text("New code in")
    expect(page.locator("#balance")).to_have_text("¥200.00")

    claims = valid_for(live, code_on_screen(page, tmp_path / "driver.png"))
    assert claims.account_id == "alice"

    page.click("button[data-topup='2000']")
    expect(page.locator("#balance")).to_have_text("¥220.00", timeout=10_000)


@pytest.mark.parametrize("service_overrides", [{"code_lifetime_s": 6}])
def test_the_driver_page_shows_a_new_code_before_the_old_one_expires(
    live: LiveService, chromium: Any, tmp_path: Path
) -> None:
    """Codes live 6 s here; the page must put a new valid one up while the old one holds."""
    page = chromium.new_page(viewport=PHONE)
    driver_sign_in(page, live)
    first = valid_for(live, code_on_screen(page, tmp_path / "driver-code-1.png"))
    assert first.expires_at - first.issued_at == timedelta(seconds=6)
    shown = page.inner_html("#qr")

    page.wait_for_function(
        "old => document.getElementById('qr').innerHTML !== old", arg=shown, timeout=10_000
    )
    changed_at = live.central.clock.now()

    assert changed_at < first.expires_at, (
        f"the code changed at {changed_at}, after the old one expired at {first.expires_at}"
    )
    code = code_on_screen(page, tmp_path / "driver-code-2.png")
    second = valid_for(live, code, at=changed_at)
    assert second.account_id == "alice"
    assert second.expires_at > first.expires_at
    assert "stale" not in (page.get_attribute("#qr", "class") or "")
    expect(page.locator("#countdown")).to_contain_text("New code in")


def test_the_event_stream_speaks_server_sent_events(live: LiveService, lot: SimLot) -> None:
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
            assert lot.drive(lot.entry, lot.driver("alice")).opened
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


def closed_stay(lot: SimLot, account_id: str) -> str:
    """Drive in and out of the demo lot through its gateways; returns the closed session."""
    driver = lot.driver(account_id)
    assert lot.drive(lot.entry, driver).opened, "the entry did not open"
    assert lot.drive(lot.exit, driver).opened, "the exit did not open"
    (found,) = lot.live.central.list_sessions(account_id=account_id, lot_id="demo")
    assert found.state == "closed", found
    return found.session_id


def test_operator_sees_revenue_and_refunds_a_stay_from_the_money_page(
    live: LiveService, lot: SimLot, chromium: Any, tmp_path: Path
) -> None:
    session_id = closed_stay(lot, "alice")  # grace 0, ¥5.00 an hour started
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

    row = page.locator("#payments tbody tr", has_text=short_id(session_id))
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
