"""Mosquitto's TLS example: each gateway is its client certificate, and nobody else.

Starts a private Mosquitto with ``deploy/mosquitto/mosquitto-tls.conf`` (paths and ports
rewritten to a temporary directory), the ACL and certificates ``qrpark broker-config --tls``
writes: a CA, a server certificate for 127.0.0.1 and two gateway client certificates. The
gateways connect with the firmware's own transport and TLS context (``make_transport``);
the central service connects with its password on the plain listener.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from reliability_report import Report
from service_guard import missing_service

from gateway_firmware.app import Hardware, Tuning, build_gateway, make_transport
from gateway_firmware.config import GatewaySettings
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import SystemClock
from parking_protocol.messages import GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import issue_code, public_key_text
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InboundMessage, Transport, TransportUnavailable
from parking_protocol.types import GateAction, Reason
from qrpark.broker import GatewayIdentity, main, write_tls
from sim_devices.devices import MarkerDecoder, ScriptedCamera, SimDisplay, SimGate

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "mosquitto" / "mosquitto-tls.conf"
GATEWAYS = [GatewayIdentity("lot1", "in1"), GatewayIdentity("lot1", "in2")]
SIGNING_KEY = Ed25519PrivateKey.generate()
IMPERSONATION = "impersonation at the broker (publish, subscribe, sign-in)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def render_example(config_dir: Path, plain_port: int, tls_port: int) -> str:
    """The TLS example with our directory and ports; fails if the example changed shape."""
    text = EXAMPLE.read_text()
    for old, new in [
        ("/mosquitto/config/", f"{config_dir}/"),
        ("/mosquitto/data/", f"{config_dir}/data/"),
        ("listener 1883 0.0.0.0", f"listener {plain_port} 127.0.0.1"),
        ("listener 8883 0.0.0.0", f"listener {tls_port} 127.0.0.1"),
        ("persistence true", "persistence false"),
        ("log_dest stdout", "log_dest stderr"),
    ]:
        assert old in text, f"{EXAMPLE.name} no longer has {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        # As root Mosquitto would switch to the "mosquitto" user and could not read our
        # 0600 server key; a private broker runs as whoever started it.
        text = "user root\n" + text
    return text


@dataclass
class TlsBroker:
    config_dir: Path
    tls_dir: Path
    other_ca_dir: Path
    plain_port: int
    tls_port: int

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    binary = "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        missing_service("mosquitto binary not installed")
    config_dir = tmp_path_factory.mktemp("tls-broker")
    tls_dir = config_dir / "tls"
    args = ["--out", str(config_dir), "--central-password", "pw-central"]
    args += ["--tls", str(tls_dir), "--tls-host", "127.0.0.1"]
    args += [arg for gw in GATEWAYS for arg in ("--gateway", f"{gw.lot_id}/{gw.gate_id}")]
    assert main(args) == 0
    # The same gateway names, signed by a CA the broker does not know.
    other_ca_dir = tmp_path_factory.mktemp("other-ca")
    write_tls(other_ca_dir, GATEWAYS, server_hosts=["127.0.0.1"])

    plain_port, tls_port = free_port(), free_port()
    conf = config_dir / "mosquitto.conf"
    conf.write_text(render_example(config_dir, plain_port, tls_port))
    log_path = config_dir / "mosquitto.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not (port_open(plain_port) and port_open(tls_port)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        yield TlsBroker(config_dir, tls_dir, other_ca_dir, plain_port, tls_port)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def gateway_settings(
    broker: TlsBroker, tmp_path: Path, gate_id: str = "in1", **tls: Path | None
) -> GatewaySettings:
    """Settings of gateway lot1/``gate_id``; ``tls`` overrides its own CA/cert/key files."""
    user = f"gw-lot1-{gate_id}"
    files: dict[str, Any] = {
        "ca_file": broker.tls_dir / "ca.crt",
        "cert_file": broker.tls_dir / f"{user}.crt",
        "key_file": broker.tls_dir / f"{user}.key",
    }
    files.update(tls)
    return GatewaySettings(
        lot_id="lot1",
        gate_id=gate_id,
        direction="entry",
        hardware="sim",
        broker_url=broker.tls_url,
        public_keys={"k1": public_key_text(SIGNING_KEY.public_key())},
        tls={k: v for k, v in files.items() if v is not None},
        outbox_path=tmp_path / f"{user}-{uuid.uuid4().hex[:6]}.db",
        heartbeat_s=3600,
        reconnect_max_s=0.2,
    )


def gateway_transport(settings: GatewaySettings, *, username: str | None = None) -> Transport:
    """The firmware's own MQTT transport and TLS context for ``settings``.

    ``username``: claim another user. The gateway's config refuses a certificate whose CN
    is not its user, so this skips validation, as modified firmware would.
    """
    if username is not None:
        settings = settings.model_copy(update={"mqtt_username": username})
    return make_transport(settings, boot=1, clock=SystemClock())


@pytest.fixture
async def central(broker: TlsBroker) -> AsyncIterator[MqttTransport]:
    """The central service: its password on the plain listener (the server side stays so)."""
    transport = MqttTransport(
        parse_broker_url(f"mqtt://127.0.0.1:{broker.plain_port}"),
        f"central-{uuid.uuid4().hex[:6]}",
        username="central",
        password="pw-central",
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    await transport.subscribe("qrpark/v1/#")
    await transport.start()
    assert await transport.wait_connected(5)
    yield transport
    await transport.close()


async def received(transport: Transport, topic: str, timeout: float = 2.0) -> list[bytes]:
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


def test_broker_config_writes_private_keys_for_the_owner_only(broker: TlsBroker) -> None:
    keys = sorted(broker.tls_dir.glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "gw-lot1-in1.key", "gw-lot1-in2.key", "server.key"]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate((broker.tls_dir / "gw-lot1-in2.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=gw-lot1-in2"  # the ACL's user


def test_broker_config_keeps_its_ca_when_run_again(broker: TlsBroker, tmp_path: Path) -> None:
    """Adding a gateway later must not invalidate the certificates the others carry."""
    directory = tmp_path / "tls"
    first = write_tls(directory, GATEWAYS[:1])
    again = write_tls(directory, GATEWAYS)
    assert again.certificate == first.certificate
    assert {p.name for p in directory.glob("gw-*.crt")} == {"gw-lot1-in1.crt", "gw-lot1-in2.crt"}


async def test_gateway_with_its_certificate_publishes_events_and_reads_its_commands(
    broker: TlsBroker, central: MqttTransport, tmp_path: Path, report: Report
) -> None:
    """The whole firmware over mutual TLS: birth, a scan event, the answer opens the gate."""
    settings = gateway_settings(broker, tmp_path)
    clock = SystemClock()
    outbox = Outbox(settings.outbox_file)
    camera, gate = ScriptedCamera(), SimGate(clock)
    gateway = build_gateway(
        settings,
        hardware=Hardware(camera=camera, decoder=MarkerDecoder(), gate=gate, display=SimDisplay()),
        transport=make_transport(settings, boot=outbox.boot, clock=clock),
        clock=clock,
        outbox=outbox,
        tuning=Tuning(tick_s=0.01, idle_sleep_s=0.005),
    )
    task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.started.wait(), 5)
        status_topic = gate_topic("lot1", "in1", TopicKind.STATUS)
        assert await received(central, status_topic, timeout=5), "no birth message"
        assert gateway.uplink.connected

        camera.push_code(issue_code(SIGNING_KEY, kid="k1", account_id="alice", now=clock.now()))
        events_topic = gate_topic("lot1", "in1", TopicKind.EVENTS)
        (payload,) = await received(central, events_topic, timeout=5)
        event = decode(payload, ScanEvent)
        assert (event.lot_id, event.gate_id) == ("lot1", "in1")
        report.events(1)

        now = clock.now()
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
        await central.publish(gate_topic("lot1", "in1", TopicKind.COMMANDS), encode(command))
        deadline = asyncio.get_running_loop().time() + 5
        while not gate.is_open:
            assert asyncio.get_running_loop().time() < deadline, "the command never arrived"
            await asyncio.sleep(0.01)
        assert gateway.stats.offline_decisions == 0
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)
        gateway.close()


async def test_a_gateways_certificate_cannot_publish_for_another_gate(
    broker: TlsBroker, central: MqttTransport, tmp_path: Path, report: Report
) -> None:
    """in1's certificate, claiming in2's username: the broker goes by the certificate."""
    report.bad_inputs[IMPERSONATION] += 1
    spy = gateway_transport(gateway_settings(broker, tmp_path), username="gw-lot1-in2")
    await spy.start()
    assert await spy.wait_connected(5)
    forged = gate_topic("lot1", "in2", TopicKind.EVENTS)
    try:
        await spy.publish(forged, b"forged")
    except TransportUnavailable:
        pass  # a broker may also drop the connection; either way nothing is delivered
    if not spy.connected:
        assert await spy.wait_connected(5)
    own = gate_topic("lot1", "in1", TopicKind.EVENTS)
    await spy.publish(own, b"own event")  # proves the central subscriber is live
    assert await received(central, own) == [b"own event"]
    assert await received(central, forged, timeout=0.5) == []
    await spy.close()


async def test_a_gateways_certificate_cannot_read_another_gates_commands(
    broker: TlsBroker, central: MqttTransport, tmp_path: Path, report: Report
) -> None:
    report.bad_inputs[IMPERSONATION] += 1
    spy = gateway_transport(gateway_settings(broker, tmp_path), username="gw-lot1-in2")
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
    "intruder",
    ["no certificate", "central's password, no certificate", "certificate from another CA"],
)
async def test_a_client_without_a_certificate_from_the_broker_ca_is_refused(
    broker: TlsBroker, tmp_path: Path, report: Report, intruder: str
) -> None:
    report.bad_inputs[IMPERSONATION] += 1
    if intruder == "certificate from another CA":
        settings = gateway_settings(
            broker,
            tmp_path,
            cert_file=broker.other_ca_dir / "gw-lot1-in1.crt",
            key_file=broker.other_ca_dir / "gw-lot1-in1.key",
        )
    else:
        settings = gateway_settings(broker, tmp_path, cert_file=None, key_file=None)
    if intruder.startswith("central's password"):
        settings = settings.model_copy(
            update={"mqtt_username": "central", "mqtt_password": SecretStr("pw-central")}
        )
    client = make_transport(settings, boot=1, clock=SystemClock())
    assert isinstance(client, MqttTransport)
    await client.start()
    try:
        # Gateways with their certificates connect within milliseconds (the tests above).
        # Under TLS 1.3 the broker's "certificate required" alert comes after the client's
        # handshake, so the transport may not have recorded an error yet: it never connected.
        assert not await client.wait_connected(1.5)
        assert client.connects == 0
    finally:
        await client.close()


async def test_the_gateway_refuses_a_broker_its_ca_did_not_sign(
    broker: TlsBroker, tmp_path: Path
) -> None:
    """The gateway checks the broker too: a stand-in broker cannot collect its events."""
    settings = gateway_settings(broker, tmp_path, ca_file=broker.other_ca_dir / "ca.crt")
    client = make_transport(settings, boot=1, clock=SystemClock())
    assert isinstance(client, MqttTransport)
    await client.start()
    try:
        assert not await client.wait_connected(1.5)
        assert "certificate verify failed" in (client.last_error or "")
    finally:
        await client.close()
