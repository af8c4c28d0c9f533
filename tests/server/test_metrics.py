"""Prometheus metrics reflect what the service decided and what it dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from parking_protocol.clock import FakeClock
from parking_protocol.messages import ScanEvent, encode, new_id
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker, InMemoryTransport
from parking_protocol.types import Direction
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.metrics import Metrics


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Central, Metrics, InMemoryTransport]]:
    broker = InMemoryBroker()
    central = build_central(
        ServerSettings(
            database_url=f"sqlite:///{tmp_path}/m.db",
            key_file=tmp_path / "k.pem",
            event_fast_path=True,
        ),
        clock=FakeClock(),
        transport=broker.client("central"),
    )
    await central.start()
    central.create_lot(LotCreate(lot_id="p1", name="P1", capacity=5))
    central.create_gate("p1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_account(AccountCreate(account_id="alice", name="Alice"))
    gateway = broker.client("gw")
    await gateway.start()
    metrics = Metrics(central)
    yield central, metrics, gateway
    await central.stop()


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_decisions_rejections_and_occupancy_are_counted(
    running: tuple[Central, Metrics, InMemoryTransport],
) -> None:
    central, metrics, gateway = running
    topic = gate_topic("p1", "in1", TopicKind.EVENTS)
    event = ScanEvent(
        event_id=new_id(),
        lot_id="p1",
        gate_id="in1",
        seq=1,
        boot=1,
        direction=Direction.ENTRY,
        code=central.issue_code("alice").code,
        scanned_at=central.clock.now(),
    )
    await gateway.publish(topic, encode(event))
    await gateway.publish(topic, encode(event))  # a redelivery
    await gateway.publish(topic, b"not json")
    await gateway.publish("qrpark/v1/lots/bad lot!/gates/in1/events", b"{}")
    for _ in range(100):
        await central.wait_idle()
        if central.stats.replays:
            break
        await asyncio.sleep(0.01)
    found = samples(metrics)
    opened = (
        "qrpark_decisions_total",
        (("action", "open"), ("kind", "command"), ("reason", "welcome")),
    )
    assert found[opened] == 2  # the original and the replayed answer
    assert found[("qrpark_events_replayed_total", ())] == 1
    # Both answers came from the batched fast path; nothing fell back to the ORM flow.
    assert found[("qrpark_events_decided_total", (("path", "fast"),))] == 2
    assert found[("qrpark_events_decided_total", (("path", "orm"),))] == 0
    assert found[("qrpark_fast_path_fallbacks_total", ())] == 0
    assert found[("qrpark_mqtt_rejected_total", (("reason", "not_json"),))] == 1
    assert found[("qrpark_mqtt_rejected_total", (("reason", "bad_topic"),))] == 1
    assert found[("qrpark_lot_occupancy", (("lot", "p1"),))] == 1
    assert found[("qrpark_dead_letters", ())] == 0
    assert found[("qrpark_scan_to_decision_seconds_count", ())] >= 1


async def test_metrics_endpoint_needs_a_viewer_token(tmp_path: Path) -> None:
    import httpx

    from server.main import create_app

    token = "qrp_" + "m" * 40
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path}/api.db",
        key_file=tmp_path / "k.pem",
        mqtt_enabled=False,
        bootstrap_api_token=token,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/metrics")).status_code == 401
            response = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            assert "qrpark_dead_letters" in response.text
