"""Bad input tried on every consumer: only typed, counted rejections, never an escaped error.

Random bytes, random JSON, random topics, and structurally valid scan events carrying
arbitrary, mutated or replayed codes go through the central service's bridge (decode AND
the full decision in a database transaction) and through a gateway's uplink.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_report import Report

from gateway_firmware.uplink.link import Uplink
from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    GatewayState,
    GatewayStatus,
    ScanEvent,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InboundMessage, InMemoryBroker
from parking_protocol.types import Direction, GateAction
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

topics = st.one_of(
    st.sampled_from(
        [
            gate_topic("p1", "in1", TopicKind.EVENTS),
            gate_topic("p1", "out1", TopicKind.EVENTS),
            gate_topic("p1", "in1", TopicKind.STATUS),
            gate_topic("p1", "in1", TopicKind.REPLIES),
            gate_topic("p1", "in1", TopicKind.COMMANDS),
            "qrpark/v1/lots/p1/denylist",
            "qrpark/v2/lots/p1/gates/in1/events",
            "",
        ]
    ),
    st.text(max_size=80),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=0, max_value=40_000).map(lambda n: b"{" * n),
)


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Central]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    clock = FakeClock()
    central = build_central(
        ServerSettings(database_url=f"sqlite:///{tmp}/fuzz.db", key_file=tmp / "key.pem"),
        clock=clock,
        transport=InMemoryBroker().client("central"),
    )
    from server import db as database

    database.upgrade(central.engine)
    central.create_lot(LotCreate(lot_id="p1", name="P1", capacity=1000))
    central.create_gate("p1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("p1", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="alice", name="Alice"))
    central.topup("alice", 100_000, idempotency_key="fuzz-topup")
    yield central
    central.engine.dispose()


@FUZZ
@given(topic=topics, payload=payloads)
def test_bridge_edge_rejects_garbage_with_a_count(
    central: Central, report: Report, topic: str, payload: bytes
) -> None:
    report.bad_inputs["MQTT topics and payloads at the service's edge"] += 1
    assert central.bridge is not None
    stats = central.bridge.stats
    before = stats.bad_topics + sum(stats.decode_failures.values())
    inbound = central.bridge.accept(InboundMessage(topic, payload))
    after = stats.bad_topics + sum(stats.decode_failures.values())
    assert (inbound is None) == (after == before + 1)


def mutate(code: str, position: int, char: str) -> str:
    position %= max(1, len(code))
    return code[:position] + char + code[position + 1 :]


@FUZZ
@given(
    gate=st.sampled_from(["in1", "out1", "nope"]),
    topic_gate=st.sampled_from(["in1", "out1", "zz9"]),
    code_kind=st.sampled_from(["valid", "mutated", "garbage", "old", "future", "stranger"]),
    position=st.integers(min_value=0, max_value=200),
    char=st.characters(codec="ascii"),
    garbage=st.text(min_size=1, max_size=120),
    direction=st.sampled_from(list(Direction)),
    offline=st.booleans(),
    dt=st.integers(min_value=-7200, max_value=7200),
)
def test_any_scan_event_gets_a_decision_and_the_ledger_stays_balanced(
    central: Central,
    report: Report,
    gate: str,
    topic_gate: str,
    code_kind: str,
    position: int,
    char: str,
    garbage: str,
    direction: Direction,
    offline: bool,
    dt: int,
) -> None:
    assert central.bridge is not None
    report.bad_inputs["scan events: mutated, replayed, misaddressed codes"] += 1
    now = central.clock.now()
    codes = {
        "valid": lambda: central.issue_code("alice").code,
        "mutated": lambda: mutate(central.issue_code("alice").code, position, char),
        "garbage": lambda: garbage,
        "old": lambda: central.issue_code("alice", now=now - timedelta(seconds=abs(dt))).code,
        "future": lambda: central.issue_code("alice", now=now + timedelta(seconds=abs(dt))).code,
        "stranger": lambda: central.sign_code("mallory").code,
    }
    offline_decision = (
        {"action": GateAction.OPEN, "reason": "welcome", "decided_at": now} if offline else None
    )
    event = ScanEvent.model_validate(
        {
            "event_id": new_id(),
            "lot_id": "p1",
            "gate_id": gate,
            "seq": 1,
            "boot": 1,
            "direction": direction,
            "code": codes[code_kind]() or "x",
            "scanned_at": now + timedelta(seconds=dt),
            "offline": offline_decision,
        }
    )
    inbound = central.bridge.accept(
        InboundMessage(gate_topic("p1", topic_gate, TopicKind.EVENTS), encode(event))
    )
    assert inbound is not None
    replies = central.bridge.process_batch([inbound])
    assert len(replies) == 1  # every event is answered (a command or an ack)
    with central.engine.connect() as conn:
        total = conn.execute(sa.text("select coalesce(sum(amount_minor), 0) from ledger_postings"))
        assert total.scalar_one() == 0
    assert central.balance("alice") >= 0 or offline


def uplink() -> Uplink:
    def birth() -> GatewayStatus:
        return GatewayStatus(
            status_id=new_id(),
            lot_id="p1",
            gate_id="in1",
            state=GatewayState.ONLINE,
            sent_at=datetime.now(UTC),
        )

    return Uplink(InMemoryBroker().client("gw"), lot_id="p1", gate_id="in1", birth_status=birth)


@FUZZ
@given(topic=topics, payload=payloads)
def test_gateway_uplink_rejects_garbage_with_a_count(
    report: Report, topic: str, payload: bytes
) -> None:
    report.bad_inputs["MQTT topics and payloads at the gateway's edge"] += 1
    link = uplink()
    message = link.accept(topic, payload)
    assert message is None
    assert link.unexpected + sum(link.malformed.values()) == 1
