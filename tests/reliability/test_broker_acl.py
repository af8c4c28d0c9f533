"""Mosquitto with one identity per gateway: an impersonating gateway is refused.

Starts a private Mosquitto with the ACL and password file ``qrpark broker-config`` writes
(the same generator produced deploy/mosquitto/acl for docker-compose).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from reliability_report import Report
from service_guard import missing_service

from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InboundMessage, TransportUnavailable
from qrpark.broker import GatewayIdentity, acl_text, main, write_passwords
from qrpark.services import MosquittoProcess, mosquitto_binary

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS = [GatewayIdentity("lot1", "in1", "pw-in1"), GatewayIdentity("lot1", "in2", "pw-in2")]


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    if mosquitto_binary() is None:
        missing_service("mosquitto binary not installed")
    conf = tmp_path_factory.mktemp("acl")
    (conf / "acl").write_text(acl_text(GATEWAYS))
    write_passwords(
        conf / "passwords", {"central": "pw-central"} | {g.username: g.password for g in GATEWAYS}
    )
    broker = MosquittoProcess(
        extra_config=(
            f"allow_anonymous false\npassword_file {conf}/passwords\nacl_file {conf}/acl\n"
        )
    )
    with broker:
        yield broker


def client(broker: MosquittoProcess, user: str | None, password: str | None) -> MqttTransport:
    return MqttTransport(
        parse_broker_url(broker.url),
        f"{user or 'anon'}-{uuid.uuid4().hex[:6]}",
        username=user,
        password=password,
        backoff_initial=0.05,
        backoff_max=0.2,
    )


@pytest.fixture
async def central(secured_broker: MosquittoProcess) -> AsyncIterator[MqttTransport]:
    transport = client(secured_broker, "central", "pw-central")
    await transport.subscribe("qrpark/v1/#")
    await transport.start()
    assert await transport.wait_connected(5)
    yield transport
    await transport.close()


async def received(transport: MqttTransport, topic: str, timeout: float = 2.0) -> list[bytes]:
    """Payloads on ``topic`` until a short quiet period."""
    found: list[bytes] = []
    iterator = transport.messages()
    while True:
        try:
            message: InboundMessage = await asyncio.wait_for(anext(iterator), timeout)
        except TimeoutError:
            return found
        if message.topic == topic:
            found.append(message.payload)
            timeout = 0.3


async def test_gateway_publishes_its_own_events(
    secured_broker: MosquittoProcess, central: MqttTransport
) -> None:
    gw = client(secured_broker, "gw-lot1-in1", "pw-in1")
    await gw.start()
    assert await gw.wait_connected(5)
    topic = gate_topic("lot1", "in1", TopicKind.EVENTS)
    await gw.publish(topic, b"own event")
    assert await received(central, topic) == [b"own event"]
    await gw.close()


async def test_impersonating_gateway_cannot_publish_for_another_gate(
    secured_broker: MosquittoProcess, central: MqttTransport, report: Report
) -> None:
    report.bad_inputs["impersonation at the broker (publish, subscribe, sign-in)"] += 1
    gw = client(secured_broker, "gw-lot1-in1", "pw-in1")
    await gw.start()
    assert await gw.wait_connected(5)
    forged_topic = gate_topic("lot1", "in2", TopicKind.EVENTS)
    try:
        await gw.publish(forged_topic, b"forged")
    except TransportUnavailable:
        pass  # a broker may also drop the connection; either way nothing is delivered
    # Then a legitimate message proves the central subscriber is live and caught up.
    own = gate_topic("lot1", "in1", TopicKind.STATUS)
    if not gw.connected:
        assert await gw.wait_connected(5)
    await gw.publish(own, b"still here")
    assert await received(central, own) == [b"still here"]
    assert await received(central, forged_topic, timeout=0.5) == []
    await gw.close()


async def test_impersonating_gateway_cannot_read_another_gates_commands(
    secured_broker: MosquittoProcess, central: MqttTransport, report: Report
) -> None:
    report.bad_inputs["impersonation at the broker (publish, subscribe, sign-in)"] += 1
    spy = client(secured_broker, "gw-lot1-in1", "pw-in1")
    other = gate_topic("lot1", "in2", TopicKind.COMMANDS)
    own = gate_topic("lot1", "in1", TopicKind.COMMANDS)
    await spy.subscribe(other)
    await spy.subscribe(own)
    await spy.start()
    assert await spy.wait_connected(5)
    await central.publish(other, b"open in2")
    await central.publish(own, b"open in1")
    messages = spy.messages()
    first = await asyncio.wait_for(anext(messages), 5)
    assert (first.topic, first.payload) == (own, b"open in1")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(messages), 0.5)
    await spy.close()


@pytest.mark.parametrize(
    ("user", "password", "reads"),
    [("central", "pw-central", True), ("gw-lot1-in1", "pw-in1", False)],
)
async def test_only_central_reads_the_broker_statistics(
    secured_broker: MosquittoProcess, user: str, password: str, reads: bool
) -> None:
    """docker-compose's healthcheck reads $SYS/broker/uptime as central; gateways may not."""
    reader = client(secured_broker, user, password)
    await reader.subscribe("$SYS/broker/uptime")
    await reader.start()
    assert await reader.wait_connected(5)
    try:
        # Mosquitto keeps $SYS topics retained: a permitted subscriber gets one at once.
        assert bool(await received(reader, "$SYS/broker/uptime", timeout=2.0)) is reads
    finally:
        await reader.close()


@pytest.mark.parametrize(("user", "password"), [("gw-lot1-in1", "wrong"), (None, None)])
async def test_wrong_password_and_anonymous_are_refused(
    secured_broker: MosquittoProcess, user: str | None, password: str | None, report: Report
) -> None:
    report.bad_inputs["impersonation at the broker (publish, subscribe, sign-in)"] += 1
    intruder = client(secured_broker, user, password)
    await intruder.start()
    assert not await intruder.wait_connected(1.5)
    assert intruder.last_error is not None
    await intruder.close()


def test_committed_compose_acl_is_the_generators_output() -> None:
    demo = [GatewayIdentity("demo", "in1"), GatewayIdentity("demo", "out1")]
    assert (ROOT / "deploy" / "mosquitto" / "acl").read_text() == acl_text(demo)


def test_broker_config_command_refuses_a_malformed_gateway(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--central-password", "x", "--gateway", "no-slash:pw"])
