"""The event hot path in process, without a broker: events/s through ``Bridge.process_batch``.

Builds a service on a fresh database (SQLite by default, or --database-url), provisions one
lot with ``--lanes`` lanes and a driver per lane, then feeds batches of real signed scan
events straight into the group-commit writer, as the MQTT consumer would: a batch of
entries (every lane at once), then a batch of their exits (priced and paid from the
wallet), and so on. Prints per-event cost and events/s for entries, exits and the mix; the
decision of every event is checked (no deny), so a fast wrong answer cannot pass.

    python bench/bench_events.py [--lanes 200] [--rounds 10] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure, print_table
from parking_protocol.clock import FakeClock
from parking_protocol.messages import GateCommand, ScanEvent, new_id
from parking_protocol.topics import TopicKind, gate_topic, parse_topic
from parking_protocol.transport import InboundMessage, Transport
from parking_protocol.types import Direction, GateAction
from server.accounts.models import AccountCreate
from server.central import build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.mqtt.bridge import Bridge, Inbound
from server.pricing.models import TariffSchema
from server.sessions.fastpath import FastPath

LOT = "hot"


class _NoTransport:
    """The bridge is driven by hand here: nothing is subscribed or published."""

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:  # pragma: no cover
        return None

    async def publish(self, *args: object, **kwargs: object) -> None:  # pragma: no cover
        return None

    def messages(self) -> AsyncIterator[InboundMessage]:  # pragma: no cover
        raise NotImplementedError


def run(
    quick: bool = True, *, database_url: str | None = None, label: str = "SQLite"
) -> list[Figure]:
    """For ``bench/run_all.py``: 200 lanes, 4 rounds (quick) or 10."""
    return measure(200, 4 if quick else 10, database_url, label)


def measure(
    lanes: int, rounds: int, database_url: str | None, label: str, *, fast: bool = True
) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="qrpark-hot-"))
    url = database_url or f"sqlite:///{work}/hot.db"
    clock = FakeClock()
    settings = ServerSettings(
        database_url=url, mqtt_enabled=False, key_file=work / "keys" / "signing.pem"
    )
    central = build_central(settings, clock=clock)
    asyncio.run(central.start())
    lot = f"{LOT}{uuid.uuid4().hex[:6]}"
    tariff = TariffSchema(grace_minutes=0, hourly_minor=500, daily_cap_minor=6000)
    central.create_lot(LotCreate(lot_id=lot, name="Hot", capacity=1_000_000, tariff=tariff))
    for i in range(lanes):
        central.create_gate(lot, GateCreate(gate_id=f"in{i}", direction=Direction.ENTRY))
        central.create_gate(lot, GateCreate(gate_id=f"out{i}", direction=Direction.EXIT))
        central.create_account(AccountCreate(account_id=f"{lot}-d{i}", name=f"Driver {i}"))
        central.topup(f"{lot}-d{i}", 100_000_000, idempotency_key=f"hot-{i}")
    transport: Transport = _NoTransport()  # type: ignore[assignment]
    bridge = Bridge(
        transport,
        central.engine,
        clock,
        central.flow_config,
        fast_path=FastPath(central.flow_config) if fast else None,
    )
    seq = [0] * lanes
    timings: dict[Direction, list[float]] = {Direction.ENTRY: [], Direction.EXIT: []}
    denied = 0

    def batch(direction: Direction) -> list[Inbound]:
        items = []
        prefix = "in" if direction is Direction.ENTRY else "out"
        for i in range(lanes):
            seq[i] += 1
            gate = f"{prefix}{i}"
            event = ScanEvent(
                event_id=new_id(),
                lot_id=lot,
                gate_id=gate,
                seq=seq[i],
                boot=1,
                direction=direction,
                code=central.issue_code(f"{lot}-d{i}", now=clock.now()).code,
                scanned_at=clock.now(),
            )
            topic = gate_topic(lot, gate, TopicKind.EVENTS)
            ref = parse_topic(topic)
            assert ref is not None
            items.append(Inbound(ref=ref, topic=topic, payload=b"", message=event))
        return items

    try:
        for _ in range(rounds):
            for direction in (Direction.ENTRY, Direction.EXIT):
                clock.advance(timedelta(minutes=30))
                items = batch(direction)
                started = time.perf_counter()
                replies = bridge.process_batch(items)
                timings[direction].append((time.perf_counter() - started) / len(items))
                for reply in replies:
                    assert isinstance(reply.message, GateCommand)
                    denied += reply.message.action is not GateAction.OPEN
    finally:
        asyncio.run(central.stop())
    if denied:
        raise SystemExit(f"{denied} events were denied: the benchmark's traffic is wrong")
    if fast and bridge.stats.fast != bridge.stats.events:
        raise SystemExit(f"only {bridge.stats.fast} of {bridge.stats.events} took the fast path")
    entry_ms = statistics.median(timings[Direction.ENTRY]) * 1000
    exit_ms = statistics.median(timings[Direction.EXIT]) * 1000
    mixed = 2 / ((entry_ms + exit_ms) / 1000)
    print(
        f"[{label}] in process, batches of {lanes}: entry {entry_ms:.3f} ms, "
        f"exit {exit_ms:.3f} ms per event; {mixed:,.0f} events/s mixed"
    )
    return [
        Figure(f"[{label}] in process: entry, per event", entry_ms, "ms", None),
        Figure(f"[{label}] in process: exit (priced, paid), per event", exit_ms, "ms", None),
        Figure(
            f"[{label}] in process: events/s (half entries, half exits)",
            mixed,
            "/s",
            2000.0 if label == "SQLite" else 1000.0,
            higher_is_better=True,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--orm", action="store_true", help="the ORM flow only (no fast path)")
    args = parser.parse_args()
    label = "PostgreSQL" if args.database_url else "SQLite"
    figures = measure(args.lanes, args.rounds, args.database_url, label, fast=not args.orm)
    print_table(figures, "event hot path")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
