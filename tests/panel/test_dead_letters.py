"""Dead letters and sequence gaps: the dashboard's alarm, the page, and resolving one."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from markupsafe import escape
from panel_support import ADMIN_PASSWORD, START, add_user, central_of, signed_in
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import ScanEvent, encode, new_id
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.audit import service as audit
from server.auth.models import Role
from server.config import ServerSettings
from server.main import create_app
from server.mqtt.bridge import Reply
from server.panel.alarms import PAYLOAD_PREVIEW
from server.sessions.flows import handle_scan
from server.sessions.models import DeadLetter

POISON = "poison:"  # scans whose code starts with this fail in the handler


def failing_on_poison(db: Session, event: ScanEvent, *args: Any, **kwargs: Any) -> Reply:
    if event.code.startswith(POISON):
        raise RuntimeError("boom <b>bold</b>")
    return handle_scan(db, event, *args, **kwargs)


@pytest.fixture
def poisonable(app: FastAPI, client: httpx.AsyncClient) -> None:
    """The bridge's scan handler fails on poison codes (the rest is handled as usual)."""
    bridge = central_of(app).bridge
    assert bridge is not None
    bridge.handler = failing_on_poison


async def publish_scan(
    app: FastAPI, broker: InMemoryBroker, *, code: str, seq: int = 0, gate_id: str = "in1"
) -> ScanEvent:
    central = central_of(app)
    gateway = broker.client(f"gw-lot1-{gate_id}-{new_id()[:6]}")
    await gateway.start()
    event = ScanEvent(
        event_id=new_id(),
        lot_id="lot1",
        gate_id=gate_id,
        seq=seq,
        boot=1,
        direction=Direction.ENTRY,
        code=code,
        scanned_at=central.clock.now(),
    )
    await gateway.publish(gate_topic("lot1", gate_id, TopicKind.EVENTS), encode(event))
    await asyncio.sleep(0.05)
    await central.wait_idle()
    await gateway.close()
    return event


def banner(html: str) -> str | None:
    """The dashboard's alarm banner as text, or None when it is hidden."""
    found = re.search(
        r'<div class="alarm" id="alarms" role="alert"( hidden)?>(.*?)\n</div>', html, re.S
    )
    assert found, "no alarm banner in the dashboard"
    if found.group(1):
        return None
    shown = re.sub(
        r"<span [^>]*hidden>.*?</span></span>|<span [^>]*hidden>.*?</span>", "", found.group(2)
    )
    return " ".join(re.sub(r"<[^>]+>", " ", shown).split())


def letters(app: FastAPI) -> list[DeadLetter]:
    with central_of(app).db() as db:
        return list(db.exec(select(DeadLetter).order_by(DeadLetter.dead_letter_id)).all())


def resolves(app: FastAPI) -> list[audit.AuditRead]:
    with central_of(app).db() as db:
        return audit.list_entries(db, action="dead_letter.resolve")


def dead_letter_metric(app: FastAPI) -> float:
    text = app.state.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qrpark_dead_letters":
                return float(sample.value)
    raise AssertionError("no qrpark_dead_letters sample")


@pytest.mark.usefixtures("poisonable")
async def test_a_dead_letter_raises_the_alarm_until_an_operator_resolves_it(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    token = await signed_in(client, "otto", "password-123")
    assert banner((await client.get("/panel/dashboard")).text) is None

    failed = await publish_scan(app, broker, code=POISON + "1", seq=1)
    later = await publish_scan(app, broker, code="junk", seq=2)  # not blocked by the failure

    [letter] = letters(app)
    assert letter.event_id == failed.event_id != later.event_id
    dashboard = await client.get("/panel/dashboard")
    shown = banner(dashboard.text)
    assert shown is not None
    assert "Unresolved dead letters: 1" in shown
    assert "Events missing" not in shown
    assert 'href="/panel/dead-letters"' in dashboard.text
    data = (await client.get("/panel/api/dashboard")).json()
    assert data["alarms"] == {
        "raised": True,
        "dead_letters": 1,
        "events_missing": 0,
        "gates_missing": 0,
    }
    assert dead_letter_metric(app) == 1

    response = await client.post(
        f"/panel/dead-letters/{letter.dead_letter_id}/resolve",
        data={"reason": "charged by hand at the booth", "csrf_token": token},
    )

    assert response.status_code == 303
    assert response.headers["location"] == "/panel/dead-letters"
    page = await client.get("/panel/dead-letters?state=resolved")
    assert f"Dead letter {letter.dead_letter_id} resolved" in page.text
    assert "charged by hand at the booth" in page.text
    [resolved] = letters(app)
    assert resolved.resolved_at == START
    assert (resolved.resolved_by, resolved.resolve_reason) == (
        "user:otto",
        "charged by hand at the booth",
    )
    [entry] = resolves(app)
    assert (entry.actor, entry.target_type, entry.target_id, entry.reason) == (
        "user:otto",
        "dead_letter",
        str(letter.dead_letter_id),
        "charged by hand at the booth",
    )
    assert entry.details["event_id"] == failed.event_id
    assert banner((await client.get("/panel/dashboard")).text) is None
    assert (await client.get("/panel/api/dashboard")).json()["alarms"]["raised"] is False
    assert dead_letter_metric(app) == 0
    unresolved = await client.get("/panel/dead-letters")
    assert "No unresolved dead letters." in unresolved.text


@pytest.mark.usefixtures("poisonable")
async def test_the_page_lists_newest_first_with_payloads_escaped_and_cut(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    add_user(app, "vera", Role.VIEWER)
    await signed_in(client, "vera", "password-123")
    first = await publish_scan(app, broker, code=POISON + "<script>alert(1)</script>" + "x" * 600)
    clock.advance(timedelta(minutes=1))
    second = await publish_scan(app, broker, code=POISON + "short")

    page = await client.get("/panel/dead-letters")

    assert page.status_code == 200
    assert page.text.index(second.event_id) < page.text.index(first.event_id)
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<b>bold</b>" not in page.text
    assert "RuntimeError: boom &lt;b&gt;bold&lt;/b&gt;" in page.text
    payload = encode(first).decode()
    assert len(payload) > PAYLOAD_PREVIEW
    assert str(escape(payload[:PAYLOAD_PREVIEW])) + "…</pre>" in page.text
    assert "x" * 600 not in page.text
    assert f"{len(encode(first))} bytes, cut" in page.text
    assert gate_topic("lot1", "in1", TopicKind.EVENTS) in page.text
    assert "2 unresolved" in page.text
    # a viewer sees them, but gets no resolve form
    assert "/resolve" not in page.text
    assert "can see dead letters but not resolve them" in page.text


@pytest.mark.usefixtures("poisonable")
async def test_a_viewer_cannot_resolve_a_dead_letter(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    add_user(app, "vera", Role.VIEWER)
    token = await signed_in(client, "vera", "password-123")
    await publish_scan(app, broker, code=POISON + "1")
    [letter] = letters(app)

    form = await client.post(
        f"/panel/dead-letters/{letter.dead_letter_id}/resolve",
        data={"reason": "looks fine to me", "csrf_token": token},
    )
    api = await client.post(
        f"/panel/api/dead-letters/{letter.dead_letter_id}/resolve",
        json={"reason": "looks fine to me"},
        headers={"X-CSRF-Token": token},
    )

    assert form.status_code == 403
    assert "needs the operator role" in form.text
    assert api.status_code == 403
    assert api.json() == {"detail": "This needs the operator role."}
    assert letters(app)[0].resolved_at is None
    assert resolves(app) == []
    assert banner((await client.get("/panel/dashboard")).text) is not None


@pytest.mark.usefixtures("poisonable")
async def test_resolving_needs_a_reason_and_happens_once(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    token = await signed_in(client, "otto", "password-123")
    await publish_scan(app, broker, code=POISON + "1")
    [letter] = letters(app)
    url = f"/panel/api/dead-letters/{letter.dead_letter_id}/resolve"

    no_reason = await client.post(
        f"/panel/dead-letters/{letter.dead_letter_id}/resolve",
        data={"reason": "  ", "csrf_token": token},
    )
    page = await client.get("/panel/dead-letters")
    assert no_reason.status_code == 303
    assert "Not resolved: a reason (at least 3 characters) is required" in page.text
    assert letters(app)[0].resolved_at is None

    done = await client.post(url, json={"reason": "replayed"}, headers={"X-CSRF-Token": token})
    again = await client.post(url, json={"reason": "replayed"}, headers={"X-CSRF-Token": token})
    unknown = await client.post(
        "/panel/api/dead-letters/999/resolve",
        json={"reason": "replayed"},
        headers={"X-CSRF-Token": token},
    )

    assert done.status_code == 200
    assert done.json()["resolved_by"] == "user:otto"
    assert again.status_code == 409
    assert unknown.status_code == 404
    assert len(resolves(app)) == 1


@pytest.mark.usefixtures("poisonable")
async def test_anonymous_is_sent_to_sign_in_and_the_api_answers_401(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    await publish_scan(app, broker, code=POISON + "1")
    [letter] = letters(app)

    page = await client.get("/panel/dead-letters")
    form = await client.post(
        f"/panel/dead-letters/{letter.dead_letter_id}/resolve", data={"reason": "nobody"}
    )
    api = await client.post(
        f"/panel/api/dead-letters/{letter.dead_letter_id}/resolve", json={"reason": "nobody"}
    )

    assert page.status_code == 303
    assert page.headers["location"] == "/panel/login?next=%2Fpanel%2Fdead-letters"
    assert form.status_code == 303
    assert form.headers["location"].startswith("/panel/login?next=")
    assert api.status_code == 401
    assert letters(app)[0].resolved_at is None
    assert resolves(app) == []


@pytest.mark.usefixtures("poisonable")
async def test_resolving_needs_the_sessions_csrf_token(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    token = await signed_in(client, "admin", ADMIN_PASSWORD)
    await publish_scan(app, broker, code=POISON + "1")
    [letter] = letters(app)
    url = f"/panel/dead-letters/{letter.dead_letter_id}/resolve"

    without_token = await client.post(url, data={"reason": "tidy up"})
    wrong_token = await client.post(url, data={"reason": "tidy up", "csrf_token": "x" * 43})
    other_site = await client.post(
        url,
        data={"reason": "tidy up", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    api_without = await client.post(
        f"/panel/api/dead-letters/{letter.dead_letter_id}/resolve", json={"reason": "tidy up"}
    )

    assert [r.status_code for r in (without_token, wrong_token, other_site, api_without)] == [
        403,
        403,
        403,
        403,
    ]
    assert letters(app)[0].resolved_at is None
    assert resolves(app) == []


async def test_a_gateways_sequence_gap_shows_until_its_outbox_replays_the_event(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    await signed_in(client)
    await publish_scan(app, broker, code="junk-1", seq=1)
    await publish_scan(app, broker, code="junk-3", seq=3)

    shown = banner((await client.get("/panel/dashboard")).text)
    page = await client.get("/panel/dead-letters")

    assert shown is not None
    assert "Events missing from gateways: 1 at 1 gate(s)" in shown
    assert "dead letters" not in shown
    row = re.search(r'<tr data-gap="lot1/in1">(.*?)</tr>', page.text, re.S)
    assert row, page.text
    cells = [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in row.group(1).split("</td>")]
    assert cells[:3] == ["lot1/in1", "1", "2"]
    assert "replays them after it reconnects" in page.text

    await publish_scan(app, broker, code="junk-2", seq=2)  # the outbox delivers it

    assert banner((await client.get("/panel/dashboard")).text) is None
    assert 'data-gap="lot1/in1"' not in (await client.get("/panel/dead-letters")).text


async def test_a_long_gap_lists_its_first_seqs_and_how_many_more(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    await signed_in(client)
    await publish_scan(app, broker, code="junk-1", seq=1)
    await publish_scan(app, broker, code="junk-40", seq=40)

    page = await client.get("/panel/dead-letters")

    assert "2, 3, 4, 5, 6, 7, 8, 9, 10, 11 … and 28 more" in page.text
    data = (await client.get("/panel/api/dashboard")).json()
    assert (data["alarms"]["events_missing"], data["alarms"]["gates_missing"]) == (38, 1)


async def test_without_mqtt_the_page_says_no_gateway_events_are_tracked(tmp_path: Path) -> None:
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path / 'qrpark.db'}",
        key_file=tmp_path / "keys" / "signing.pem",
        admin_password=ADMIN_PASSWORD,
        mqtt_enabled=False,
    )
    app = create_app(settings, clock=FakeClock(START))
    async with app.router.lifespan_context(app):
        assert central_of(app).bridge is None
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            await signed_in(http)
            dashboard = await http.get("/panel/dashboard")
            page = await http.get("/panel/dead-letters")

    assert banner(dashboard.text) is None
    assert page.status_code == 200
    assert "MQTT is disabled on this service" in page.text
