"""Money figures: quotes per second from the tariff engine, settlements per second through
the database (SQLite and PostgreSQL).

* quotes: ``price()`` for random stays of 5 min to 3 days under a simple tariff, and under a
  banded one (night and weekend bands, 15-minute increments, calendar-day cap, DST zone);
* settlements: exit events through the real flow (verify the code, find the stay, price it
  with its tariff version, permit and validations, charge the wallet through the ledger,
  close it, record the processed event), committed like the MQTT bridge does: batches of
  ``--batch`` events in one transaction, a SAVEPOINT each. Entries are opened beforehand.

    python bench/bench_money.py [--quotes 20000] [--exits 2000] [--batch 200]
                                [--postgres-url postgresql+psycopg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session

from parking_protocol.clock import FakeClock
from parking_protocol.messages import ScanEvent, new_id
from parking_protocol.topics import TopicKind, TopicRef
from parking_protocol.types import Direction, GateAction
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.pricing.engine import Band, CapPeriod, Tariff, price
from server.pricing.models import TariffSpec
from server.sessions.flows import handle_scan

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SIMPLE = Tariff.simple(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000)
BANDED = Tariff(
    timezone="Europe/Berlin",
    grace_minutes=10,
    first_period_minutes=60,
    first_period_minor=400,
    increment_minutes=15,
    increment_minor=125,
    daily_cap_minor=3000,
    cap_period=CapPeriod.CALENDAR_DAY,
    bands=(
        Band("Night", clock_time(22), clock_time(7), increment_minor=25, cap_minor=400),
        Band(
            "Weekend", clock_time(0), clock_time(0), increment_minor=75, weekdays=frozenset({5, 6})
        ),
    ),
    max_per_stay_minor=20_000,
)


def quotes_per_second(tariff: Tariff, n: int) -> float:
    rng = random.Random(1)
    stays = [
        (
            START + timedelta(minutes=rng.randrange(0, 365 * 24 * 60)),
            timedelta(minutes=rng.randrange(5, 3 * 24 * 60)),
        )
        for _ in range(n)
    ]
    began = time.perf_counter()
    for entry, stay in stays:
        price(tariff, entry, entry + stay)
    return n / (time.perf_counter() - began)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"qrpark_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _event(central: Central, account: str, gate: str, direction: Direction, seq: int) -> ScanEvent:
    return ScanEvent(
        event_id=new_id(),
        lot_id="bench",
        gate_id=gate,
        seq=seq,
        boot=1,
        direction=direction,
        code=central.sign_code(account).code,
        scanned_at=central.clock.now(),
    )


def _run_batches(central: Central, events: list[ScanEvent], batch: int) -> list[GateAction]:
    actions: list[GateAction] = []
    for start in range(0, len(events), batch):
        with Session(central.engine, expire_on_commit=False) as db, db.begin():
            for event in events[start : start + batch]:
                ref = TopicRef(event.lot_id, event.gate_id, TopicKind.EVENTS)
                with db.begin_nested():
                    reply = handle_scan(
                        db, event, ref, now=central.clock.now(), config=central.flow_config
                    )
                actions.append(getattr(reply.message, "action", GateAction.OPEN))
    return actions


def settlements_per_second(database_url: str, exits: int, batch: int, key_dir: Path) -> float:
    clock = FakeClock(START)
    settings = ServerSettings(
        database_url=database_url, key_file=key_dir / "k.pem", mqtt_enabled=False
    )
    central = build_central(settings, clock=clock)
    asyncio.run(central.start())
    try:
        central.create_lot(
            LotCreate(
                lot_id="bench",
                name="Bench",
                capacity=exits + 10,
                timezone="Europe/Berlin",
                tariff=TariffSpec(grace_minutes=10, increment_minutes=15, increment_minor=125),
            )
        )
        central.create_gate("bench", GateCreate(gate_id="in", direction=Direction.ENTRY))
        central.create_gate("bench", GateCreate(gate_id="out", direction=Direction.EXIT))
        accounts = [f"d{i}" for i in range(exits)]
        for account in accounts:
            central.create_account(AccountCreate(account_id=account, name=account))
            central.topup(account, 100_000, idempotency_key="seed")
        entries = [_event(central, a, "in", Direction.ENTRY, i) for i, a in enumerate(accounts)]
        assert set(_run_batches(central, entries, batch)) == {GateAction.OPEN}
        clock.advance(timedelta(hours=3, minutes=7))
        leaving = [_event(central, a, "out", Direction.EXIT, i) for i, a in enumerate(accounts)]
        began = time.perf_counter()
        actions = _run_batches(central, leaving, batch)
        elapsed = time.perf_counter() - began
        assert set(actions) == {GateAction.OPEN}, "every exit must settle"
        return exits / elapsed
    finally:
        asyncio.run(central.stop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quotes", type=int, default=20_000)
    parser.add_argument("--exits", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    for name, tariff in (
        ("simple (hourly, rolling cap)", SIMPLE),
        ("banded (15 min, bands, DST zone)", BANDED),
    ):
        rows.append((f"quotes/s, {name}", f"{quotes_per_second(tariff, args.quotes):,.0f}"))

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = settlements_per_second(
            f"sqlite:///{tmp}/bench.db", args.exits, args.batch, Path(tmp)
        )
        rows.append(("settlements/s, SQLite (WAL)", f"{sqlite:,.0f}"))
        if not args.no_postgres:
            try:
                with postgres_database(args.postgres_url) as url:
                    figure = settlements_per_second(url, args.exits, args.batch, Path(tmp))
                rows.append(("settlements/s, PostgreSQL", f"{figure:,.0f}"))
            except sa.exc.OperationalError as exc:
                rows.append(("settlements/s, PostgreSQL", f"unavailable ({exc.orig})"))

    width = max(len(label) for label, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"\n{args.exits} exits, batches of {args.batch}; {args.quotes} stays of 5 min-3 days")


if __name__ == "__main__":
    main()
