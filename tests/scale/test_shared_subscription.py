"""Past one machine: two central-service processes share the gate events of one city.

Two ``python -m server`` processes (the real service, uvloop, its own MQTT client each)
subscribe with the same ``QRPARK_MQTT_SHARED_GROUP``, so Mosquitto hands each event of
``$share/{group}/qrpark/v1/lots/+/gates/+/events`` to ONE of them, round robin; both write
to one PostgreSQL database. Bare-protocol gates (a real MQTT client per gate) publish signed
scan events and, like a gateway's outbox, publish an unanswered event again (same
``event_id``) until they get its command. One process is SIGKILLed mid-traffic and
restarted 3 s later with the same client id (as a supervisor would): its persistent broker
session delivers what Mosquitto queued for it meanwhile.

Checked: both processes took a fair share; every event answered, and never with two
different commands; one session per entry, one payment per exit, every ledger transaction
balanced, every wallet = top-up - charges, no dead letter; per gate, events decided in
``seq`` order. A duplicate handed to both processes at the same moment gets one answer:
the loser of that race sends the winner's stored reply.

Which process handled an event is read from the outside: each process is started with the
MQTT transport's packet log switched on (logger ``parking_protocol.mqtt.packets`` at
DEBUG), and every
``Received PUBLISH ... /events`` line in its log is one event the broker gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parking_protocol.messages import GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import issue_code
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.types import Direction, GateAction, Reason
from qrpark.services import MosquittoProcess, free_port
from server import db as database
from server.accounts.models import AccountCreate
from server.central import build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.keys import KeyRing, load_or_create_keys
from server.lots.models import LotCreate, TariffSchema

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.broker, pytest.mark.postgres]

HOURLY = 500  # a stay of a few seconds is one started hour
START_BALANCE = 1_000_000
RETRY_S = 5.0  # an unanswered event is published again (gateway decision timeout + margin)
ANSWER_DEADLINE_S = 30.0

# Started instead of ``python -m server`` only to switch the MQTT packet log on.
LAUNCH = (
    "import logging, sys; "
    "logging.getLogger('parking_protocol.mqtt.packets').setLevel(logging.DEBUG); "
    "from server.cli import main; sys.exit(main(sys.argv[1:]))"
)


def api_token() -> str | None:
    """The REST API's bearer token, if this deployment uses one (``QRPARK_API_TOKEN``)."""
    return os.environ.get("QRPARK_API_TOKEN")


class CentralProcess:
    """One central-service process with a stable MQTT client id (its broker session)."""

    def __init__(
        self, name: str, *, database_url: str, broker_url: str, key_file: Path, group: str
    ) -> None:
        self.name = name
        self.client_id = f"scale-{name}-{uuid.uuid4().hex[:8]}"
        self.workdir = key_file.parent
        self.env = {
            **os.environ,
            "QRPARK_DATABASE_URL": database_url,
            "QRPARK_MQTT_URL": broker_url,
            "QRPARK_MQTT_CLIENT_ID": self.client_id,
            "QRPARK_MQTT_SHARED_GROUP": group,
            "QRPARK_KEY_FILE": str(key_file),
            "QRPARK_AUTO_MIGRATE": "false",  # migrated once, before the processes start
        }
        if (token := api_token()) is not None:
            self.env["QRPARK_BOOTSTRAP_API_TOKEN"] = token
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.port = 0

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self) -> CentralProcess:
        self.port = free_port()
        log_path = self.workdir / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LAUNCH,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "WARNING",
                    "--no-access-log",
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def ready(self) -> bool:
        headers = {"authorization": f"Bearer {t}"} if (t := api_token()) else {}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/ready", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(json.loads(response.read()).get("mqtt") == "connected")
        except (OSError, ValueError, urllib.error.HTTPError):
            return False

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.ready):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"central {self.name} did not start:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no drain, no DISCONNECT; in-flight batches are simply gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def events_received(self, log: Path | None = None) -> int:
        """Scan events the broker delivered to this process (from its MQTT packet log)."""
        text = (log or self.log).read_text(errors="replace")
        return sum(
            1 for line in text.splitlines() if "Received PUBLISH" in line and "/events'" in line
        )


@dataclass
class Sent:
    """One scan event as its gate saw it: when it went out, what came back."""

    event: ScanEvent
    publishes: int = 0
    first_at: float = 0.0
    answered_at: float = 0.0
    answers: list[GateCommand] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class SimGate:
    """A bare-protocol gate: one event in flight, republished until answered."""

    def __init__(self, broker_url: str, lot: str, gate_id: str, direction: Direction) -> None:
        self.lot = lot
        self.gate_id = gate_id
        self.direction = direction
        self.transport = MqttTransport(
            parse_broker_url(broker_url), f"scale-gw-{lot}-{gate_id}-{uuid.uuid4().hex[:6]}"
        )
        self.sent: dict[str, Sent] = {}
        self.order: list[str] = []  # event ids in the order this gate published them
        self.seq = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.transport.subscribe(gate_topic(self.lot, self.gate_id, TopicKind.COMMANDS))
        await self.transport.start()
        assert await self.transport.wait_connected(10), "gate cannot reach the broker"
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.transport.messages():
            command = decode(message.payload)
            if isinstance(command, GateCommand) and command.event_id in self.sent:
                sent = self.sent[command.event_id]
                sent.answers.append(command)
                if not sent.answered.is_set():
                    sent.answered_at = time.monotonic()
                    sent.answered.set()

    def event(self, code: str) -> ScanEvent:
        self.seq += 1
        return ScanEvent(
            event_id=new_id(),
            lot_id=self.lot,
            gate_id=self.gate_id,
            seq=self.seq,
            boot=1,
            direction=self.direction,
            code=code,
            scanned_at=datetime.now(UTC),
        )

    async def publish(self, sent: Sent) -> None:
        sent.publishes += 1
        sent.first_at = sent.first_at or time.monotonic()
        topic = gate_topic(self.lot, self.gate_id, TopicKind.EVENTS)
        await self.transport.publish(topic, encode(sent.event), qos=1)

    async def scan(self, code: str) -> GateCommand:
        sent = Sent(self.event(code))
        self.sent[sent.event.event_id] = sent
        self.order.append(sent.event.event_id)
        deadline = time.monotonic() + ANSWER_DEADLINE_S
        while not sent.answered.is_set():
            assert time.monotonic() < deadline, f"{self.gate_id}: no answer in time"
            await self.publish(sent)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sent.answered.wait(), RETRY_S)
        return sent.answers[0]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.transport.close()


@dataclass
class City:
    lot: str
    database_url: str
    broker_url: str
    keys: KeyRing
    lanes: list[tuple[SimGate, SimGate]]
    a: CentralProcess
    b: CentralProcess

    def code(self, account: str) -> str:
        key = self.keys.active
        return issue_code(key.private_key, kid=key.kid, account_id=account, now=datetime.now(UTC))

    def gates(self) -> list[SimGate]:
        return [gate for lane in self.lanes for gate in lane]

    def sent(self) -> list[Sent]:
        return [sent for gate in self.gates() for sent in gate.sent.values()]


def provision(database_url: str, key_file: Path, lot: str, lanes: int) -> KeyRing:
    """Migrate once and create the lot, its gates and one funded account per lane."""
    database.upgrade(database_url)
    settings = ServerSettings(
        database_url=database_url, key_file=key_file, mqtt_enabled=False, auto_migrate=False
    )
    central = build_central(settings)
    try:
        central.create_lot(
            LotCreate(
                lot_id=lot,
                name="Scale",
                capacity=100_000,
                tariff=TariffSchema(
                    grace_minutes=0, hourly_minor=HOURLY, daily_cap_minor=6000, currency="CNY"
                ),
            )
        )
        for i in range(lanes):
            central.create_gate(lot, GateCreate(gate_id=f"in{i}", direction=Direction.ENTRY))
            central.create_gate(lot, GateCreate(gate_id=f"out{i}", direction=Direction.EXIT))
            central.create_account(AccountCreate(account_id=f"{lot}-d{i}", name=f"Driver {i}"))
            central.topup(f"{lot}-d{i}", START_BALANCE, idempotency_key=f"init-{lot}-{i}")
    finally:
        central.engine.dispose()
    return central.keys


@pytest.fixture
async def city(
    mosquitto: MosquittoProcess, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[City]:
    lot = f"c{uuid.uuid4().hex[:6]}"
    key_file = tmp_path / "signing.pem"
    lanes = 16
    keys = await asyncio.to_thread(provision, fresh_postgres_url, key_file, lot, lanes)
    assert load_or_create_keys(key_file).active.kid == keys.active.kid
    group = f"g{uuid.uuid4().hex[:8]}"
    a, b = (
        CentralProcess(
            name,
            database_url=fresh_postgres_url,
            broker_url=mosquitto.url,
            key_file=key_file,
            group=group,
        )
        for name in ("a", "b")
    )
    gates = [
        (
            SimGate(mosquitto.url, lot, f"in{i}", Direction.ENTRY),
            SimGate(mosquitto.url, lot, f"out{i}", Direction.EXIT),
        )
        for i in range(lanes)
    ]
    try:
        a.start()
        b.start()
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        for pair in gates:
            for gate in pair:
                await gate.start()
        yield City(lot, fresh_postgres_url, mosquitto.url, keys, gates, a, b)
    finally:
        for pair in gates:
            for gate in pair:
                await gate.close()
        a.stop()
        b.stop()


@dataclass(frozen=True)
class Books:
    """What the database says happened, for the exactly-once checks."""

    processed: int
    sessions: Counter[str]  # by state
    payments_per_session: Counter[str]
    charged: dict[str, int]  # account -> total captured
    wallets: dict[str, int]  # account -> wallet balance
    unbalanced_transactions: int
    dead_letters: int
    order_violations: list[str]

    @classmethod
    def read(cls, url: str, lot: str) -> Books:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as db:

                def rows(sql: str) -> list[tuple[Any, ...]]:
                    return [tuple(row) for row in db.execute(sa.text(sql), {"lot": lot})]

                processed = rows(
                    "select gate_id, seq, processed_at from processed_events where lot_id = :lot"
                    " order by gate_id, seq"
                )
                violations = []
                for before, after in itertools.pairwise(processed):
                    if before[0] == after[0] and after[2] < before[2]:
                        violations.append(f"{after[0]}: seq {after[1]} decided before {before[1]}")
                return cls(
                    processed=len(processed),
                    sessions=Counter(
                        {
                            str(state): int(n)
                            for state, n in rows(
                                "select state, count(*) from parking_sessions"
                                " where lot_id = :lot group by state"
                            )
                        }
                    ),
                    payments_per_session=Counter(
                        {
                            str(s): int(n)
                            for s, n in rows(
                                "select session_id, count(*) from payments where lot_id = :lot"
                                " group by session_id"
                            )
                        }
                    ),
                    charged={
                        str(acc): int(total)
                        for acc, total in rows(
                            "select account_id, sum(amount_minor) from payments"
                            " where lot_id = :lot group by account_id"
                        )
                    },
                    wallets={
                        str(acc)[len("wallet:") :]: int(total)
                        for acc, total in rows(
                            "select ledger_account, sum(amount_minor) from ledger_postings"
                            " where ledger_account like 'wallet:' || :lot || '-%'"
                            " group by ledger_account"
                        )
                    },
                    unbalanced_transactions=len(
                        rows(
                            "select transaction_id from ledger_postings group by transaction_id"
                            " having sum(amount_minor) <> 0"
                        )
                    ),
                    dead_letters=int(
                        db.execute(sa.text("select count(*) from dead_letters")).scalar_one()
                    ),
                    order_violations=violations,
                )
        finally:
            engine.dispose()


async def drive(city: City, cycles: int, pause_s: float, answered: list[int]) -> None:
    """Every lane: entry, exit, entry, exit ... each with a fresh signed code."""

    async def lane(i: int, entry: SimGate, exit_: SimGate) -> None:
        account = f"{city.lot}-d{i}"
        await asyncio.sleep(i * pause_s / len(city.lanes))  # lanes out of phase
        for _ in range(cycles):
            for gate in (entry, exit_):
                command = await gate.scan(city.code(account))
                answered[0] += 1
                expected = Reason.WELCOME if gate is entry else Reason.PAID
                assert (command.action, command.reason) == (GateAction.OPEN, expected), command
                await asyncio.sleep(pause_s)

    await asyncio.gather(*(lane(i, *pair) for i, pair in enumerate(city.lanes)))


def latency_line(city: City, label: str, when: Callable[[float], bool]) -> str:
    """Publish-to-answer latency of the events first published ``when``."""
    group = [item for item in city.sent() if when(item.first_at)]
    lat = sorted((item.answered_at - item.first_at) * 1000 for item in group)
    if len(lat) < 2:
        return f"{label}: {len(lat)} events"
    q = statistics.quantiles(lat, n=100)
    return (
        f"{label}: {len(lat)} events, p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {lat[-1]:.0f}"
        f" ms, republished {sum(item.publishes - 1 for item in group)}"
    )


def check_exactly_once(city: City, books: Books, cycles: int) -> None:
    lanes = len(city.lanes)
    sent = city.sent()
    assert len(sent) == lanes * cycles * 2
    # Every event answered; a redelivered event got the stored answer, never a second one.
    for item in sent:
        assert item.answers, f"{item.event.event_id} never answered"
        ids = {command.command_id for command in item.answers}
        assert len(ids) == 1, f"{item.event.event_id} got different answers: {item.answers}"
    assert books.processed == len(sent)
    assert books.sessions == Counter({"closed": lanes * cycles})
    assert set(books.payments_per_session.values()) == {1}
    assert len(books.payments_per_session) == lanes * cycles
    assert books.unbalanced_transactions == 0
    for i in range(lanes):
        account = f"{city.lot}-d{i}"
        assert books.charged[account] == cycles * HOURLY
        assert books.wallets[account] == START_BALANCE - cycles * HOURLY
    # A redelivery that reaches both processes at the same moment is answered by the loser
    # with the winner's stored reply: never a dead letter.
    assert books.dead_letters == 0
    assert books.order_violations == []


async def test_two_processes_share_the_events_exactly_once_and_survive_a_kill(
    city: City,
) -> None:
    cycles, pause_s, restart_after_s = 10, 0.1, 3.0
    total = len(city.lanes) * cycles * 2
    answered = [0]
    traffic = asyncio.create_task(drive(city, cycles, pause_s, answered))

    # Mid-traffic: both have been working; then A dies without a word.
    while answered[0] < total * 0.4:
        assert not traffic.done(), traffic
        await asyncio.sleep(0.05)
    answered_before = answered[0]  # the packet logs read next saw at least these
    before_kill = {p.name: p.events_received() for p in (city.a, city.b)}
    await asyncio.to_thread(city.a.kill)
    killed_at, killed_mono = answered[0], time.monotonic()

    # Mosquitto keeps routing A's share to A's (persistent, now offline) session: those
    # events wait there, or for the gate to publish them again (which B may then take).
    # A supervisor restarts A with the same client id and the session delivers them.
    await asyncio.sleep(restart_after_s)
    answered_while_down = answered[0] - killed_at
    city.a.start()
    await city.a.wait_ready()
    restarted_mono = time.monotonic()
    await asyncio.wait_for(traffic, 60)
    await asyncio.sleep(1.0)  # late duplicates from A's session, if any

    received = sum(before_kill.values())
    # The packet log sees every delivery (not the answers that came while A was being
    # killed: the counts were read before).
    assert received >= answered_before, before_kill
    for name, count in before_kill.items():
        assert count >= received * 0.25, f"{name} did {count} of {received}: {before_kill}"
    assert killed_at < total
    after_restart = city.a.events_received()
    assert after_restart > 0, "the restarted A took no events"
    assert answered_while_down > 0, "B answered nothing while A was down"

    # Every event answered once, effects exactly once, ledger balanced, order per gate.
    books = await asyncio.to_thread(Books.read, city.database_url, city.lot)
    check_exactly_once(city, books, cycles)
    republished = sum(item.publishes - 1 for item in city.sent())
    print("\n" + latency_line(city, "before the kill", lambda t: t < killed_mono))
    print(latency_line(city, "A down", lambda t: killed_mono <= t < restarted_mono))
    print(latency_line(city, "A restarted", lambda t: t >= restarted_mono))
    print(
        f"events {total}; before the kill A got {before_kill['a']}, B got {before_kill['b']};"
        f" A killed after {killed_at} answers; {answered_while_down} answered while A was"
        f" down; restarted A received {after_restart} (its queued session + new share);"
        f" gates republished {republished}"
    )


async def test_a_duplicate_delivered_to_both_processes_at_once_gets_one_answer(
    city: City,
) -> None:
    """QoS 1 redelivery can hand the same event to A and to B at the same moment."""
    sent: list[tuple[SimGate, Sent]] = []
    for round_ in range(3):  # entries, exits, entries: each a burst of duplicated events
        burst = []
        for i, (entry, exit_) in enumerate(city.lanes):
            gate = exit_ if round_ == 1 else entry
            item = Sent(gate.event(city.code(f"{city.lot}-d{i}")))
            gate.sent[item.event.event_id] = item
            burst.append((gate, item))
        # Back to back, so the shared subscription's round robin gives one copy to each.
        await asyncio.gather(*(g.publish(item) for g, item in burst for _ in range(2)))
        for _gate, item in burst:
            await asyncio.wait_for(item.answered.wait(), 10)
        await asyncio.sleep(1.0)  # the second answer, if any
        sent += burst

    answers = defaultdict(set)
    for _gate, item in sent:
        for command in item.answers:
            answers[item.event.event_id].add((command.command_id, command.action, command.reason))
    contradicting = {k: v for k, v in answers.items() if len(v) > 1}
    books = await asyncio.to_thread(Books.read, city.database_url, city.lot)
    assert books.sessions["open"] == len(city.lanes)
    assert contradicting == {}, f"{len(contradicting)} events got two different answers"
    assert books.dead_letters == 0
