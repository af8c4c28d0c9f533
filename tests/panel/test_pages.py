"""Dashboard, live feed, gate status history, sessions, accounts and audit pages."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from fastapi import FastAPI
from panel_support import central_of, signed_in

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    GateCommand,
    GatewayState,
    GatewayStatus,
    ScanEvent,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic, parse_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, GateAction, Reason
from server.mqtt.bridge import Inbound
from server.panel.live import EventHub
from server.sessions.flows import Reply


async def scan(
    app: FastAPI, broker: InMemoryBroker, gate_id: str, direction: Direction, code: str
) -> None:
    central = central_of(app)
    gateway = broker.client(f"gw-lot1-{gate_id}")
    await gateway.start()
    event = ScanEvent(
        event_id=new_id(),
        lot_id="lot1",
        gate_id=gate_id,
        seq=0,
        boot=1,
        direction=direction,
        code=code,
        scanned_at=central.clock.now(),
    )
    await gateway.publish(gate_topic("lot1", gate_id, TopicKind.EVENTS), encode(event))
    await asyncio.sleep(0.05)
    await central.wait_idle()


async def status(
    app: FastAPI, broker: InMemoryBroker, state: GatewayState, *, boot: int = 1, fw: str = "1.0"
) -> None:
    central = central_of(app)
    gateway = broker.client("gw-lot1-in1-status")
    await gateway.start()
    message = GatewayStatus(
        status_id=new_id(),
        lot_id="lot1",
        gate_id="in1",
        state=state,
        direction=Direction.ENTRY,
        firmware_version=fw,
        boot=boot,
        sent_at=central.clock.now(),
    )
    await gateway.publish(gate_topic("lot1", "in1", TopicKind.STATUS), encode(message), retain=True)
    await asyncio.sleep(0.05)
    await central.wait_idle()
    await asyncio.sleep(0.05)  # the history writer runs after the batch


async def test_dashboard_shows_occupancy_gates_and_the_live_feed(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await signed_in(client)
    await status(app, broker, GatewayState.ONLINE, fw="2.1.0")
    central = central_of(app)
    await scan(app, broker, "in1", Direction.ENTRY, central.issue_code("alice").code)
    await scan(app, broker, "out1", Direction.EXIT, central.issue_code("bob").code)
    clock.advance(timedelta(seconds=42))

    data = (await client.get("/panel/api/dashboard")).json()
    page = await client.get("/panel/dashboard")

    lot1 = next(lot for lot in data["lots"] if lot["lot_id"] == "lot1")
    assert (lot1["used"], lot1["capacity"], lot1["full"]) == (1, 2, False)
    gates = {gate["gate_id"]: gate for gate in lot1["gates"]}
    assert gates["in1"]["state"] == "online"
    assert gates["in1"]["seconds_since"] == 42
    assert gates["in1"]["firmware_version"] == "2.1.0"
    assert gates["out1"]["state"] == "unknown"
    feed = [e for e in app.state.panel.hub.recent() if not e.get("quiet")]
    assert [(e["kind"], e["account_id"], e["reason"]) for e in feed] == [
        ("entry", "alice", "welcome"),
        ("denied", "bob", "no_open_session"),
    ]
    assert "42 s ago" in page.text
    assert "no_open_session" in page.text
    assert 'id="feed"' in page.text


async def test_a_full_lot_and_a_silent_gateway_are_shown_as_such(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await signed_in(client)
    central = central_of(app)
    await status(app, broker, GatewayState.ONLINE)
    await scan(app, broker, "in1", Direction.ENTRY, central.issue_code("alice").code)
    await scan(app, broker, "in1", Direction.ENTRY, central.issue_code("bob").code)
    clock.advance(timedelta(minutes=5))

    lot1 = (await client.get("/panel/api/dashboard")).json()["lots"][0]

    assert (lot1["used"], lot1["full"]) == (2, True)
    assert lot1["gates"][0]["state"] == "stale"
    assert "FULL" in (await client.get("/panel/dashboard")).text


async def test_gate_page_keeps_status_changes_not_heartbeats(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    await signed_in(client)
    await status(app, broker, GatewayState.ONLINE, boot=1, fw="1.0")
    await status(app, broker, GatewayState.ONLINE, boot=1, fw="1.0")  # a heartbeat
    await status(app, broker, GatewayState.OFFLINE, boot=1, fw="1.0")
    await status(app, broker, GatewayState.ONLINE, boot=2, fw="1.1")

    page = await client.get("/panel/gates/lot1/in1")
    gates = await client.get("/panel/gates")

    assert page.status_code == 200
    history = page.text.split("Status history")[1]
    assert history.count("<tr><td>") == 3
    assert "1.1" in gates.text


async def test_sessions_can_be_filtered_and_show_the_price_breakdown_and_payment(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await signed_in(client)
    central = central_of(app)
    await scan(app, broker, "in1", Direction.ENTRY, central.issue_code("alice").code)
    clock.advance(timedelta(hours=2))
    await scan(app, broker, "out1", Direction.EXIT, central.issue_code("alice").code)
    [closed] = central.list_sessions(account_id="alice")

    listing = await client.get(
        "/panel/sessions", params={"lot": "lot1", "account": "alice", "state": "closed"}
    )
    none_open = await client.get("/panel/sessions", params={"state": "open"})
    by_day = await client.get(
        "/panel/sessions", params={"since": "2026-03-02", "until": "2026-03-02"}
    )
    day_after = await client.get("/panel/sessions", params={"since": "2026-03-03"})
    detail = await client.get(f"/panel/sessions/{closed.session_id}")

    assert closed.session_id in listing.text
    assert closed.session_id not in none_open.text
    assert closed.session_id in by_day.text
    assert closed.session_id not in day_after.text
    assert detail.status_code == 200
    assert "Asia/Shanghai" in detail.text or "CST" in detail.text
    assert "wallet:alice" in detail.text
    assert closed.amount is not None
    assert closed.amount.display() in detail.text


async def test_accounts_can_be_found_by_id_or_name(client: httpx.AsyncClient) -> None:
    await signed_in(client)

    by_name = await client.get("/panel/accounts", params={"q": "liddell"})
    by_id = await client.get("/panel/accounts", params={"q": "bo"})

    assert "/panel/accounts/alice" in by_name.text
    assert "/panel/accounts/bob" not in by_name.text
    assert "/panel/accounts/bob" in by_id.text
    detail = await client.get("/panel/accounts/alice")
    assert "¥100.00" in detail.text


async def test_audit_page_lists_sign_ins(client: httpx.AsyncClient) -> None:
    await signed_in(client)

    page = await client.get("/panel/audit", params={"action": "auth.login"})

    assert "auth.login" in page.text
    assert "user:admin" in page.text


async def test_the_hub_drops_old_events_for_a_slow_subscriber_and_ends_on_close() -> None:
    hub = EventHub(keep=3, queue_size=2)
    with hub.subscription() as queue:
        for number in range(5):
            hub.publish({"kind": "entry", "n": number})
        assert [e["n"] for e in hub.recent()] == [2, 3, 4]
        assert [queue.get_nowait()["n"], queue.get_nowait()["n"]] == [3, 4]  # type: ignore[index]
        hub.close()
        assert queue.get_nowait() is None


def _decided_batch(count: int) -> tuple[list[Inbound], list[Reply]]:
    from datetime import UTC, datetime

    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    topic = gate_topic("lot1", "in1", TopicKind.EVENTS)
    ref = parse_topic(topic)
    assert ref is not None
    batch: list[Inbound] = []
    replies: list[Reply] = []
    for n in range(count):
        event = ScanEvent(
            event_id=new_id(),
            lot_id="lot1",
            gate_id="in1",
            seq=n,
            boot=1,
            direction=Direction.ENTRY,
            code="QP1.not-checked-here",
            scanned_at=now,
        )
        batch.append(Inbound(ref=ref, topic=topic, payload=encode(event), message=event))
        command = GateCommand(
            command_id=new_id(),
            event_id=event.event_id,
            lot_id="lot1",
            gate_id="in1",
            action=GateAction.OPEN,
            reason=Reason.WELCOME,
            display="Welcome",
            issued_at=now,
            deadline=now + timedelta(seconds=10),
        )
        replies.append(Reply(topic="t", payload=b"", message=command, expiry=10))
    return batch, replies


def test_a_big_batch_nobody_watches_fills_the_short_memory_with_its_last_scans() -> None:
    batch, replies = _decided_batch(8)
    quiet = EventHub(keep=3)
    quiet.on_batch(batch, replies)
    assert [e["event_id"] for e in quiet.recent()] == [i.message.event_id for i in batch[-3:]]

    watched = EventHub(keep=3, queue_size=100)
    with watched.subscription() as queue:
        watched.on_batch(batch, replies)
        assert queue.qsize() == 8  # a watching panel gets every scan
    assert [e["event_id"] for e in watched.recent()] == [e["event_id"] for e in quiet.recent()]
    # The feed events kept unbuilt while nobody watched are the ones a watcher got.
    unnumbered = [{k: v for k, v in e.items() if k != "id"} for e in quiet.recent()]
    assert quiet.recent()[0] is quiet.recent()[0]  # built once, not on every page
    assert unnumbered == [{k: v for k, v in e.items() if k != "id"} for e in watched.recent()]
