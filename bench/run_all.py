"""Run every benchmark at a size that finishes in a few minutes and print one table.

    python bench/run_all.py [--full] [--only NAME ...]

Each ``bench/bench_*.py`` that defines ``run(quick: bool) -> list[Figure]`` takes part.
PostgreSQL figures are included when a server answers on 127.0.0.1:5432 (database
``test``, or ``QRPARK_BENCH_POSTGRES_URL``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure, print_table
from qrpark.services import port_open

BENCHES = [
    "bench_decode",
    "bench_events",
    "bench_latency",
    "bench_money",
    "bench_gateway",
    "bench_api",
    "bench_sim",
]

WITH_POSTGRES = frozenset({"bench_events", "bench_latency"})  # run again on PostgreSQL


def postgres_database() -> tuple[str, Callable[[], None]] | None:
    """A throwaway PostgreSQL database for the benchmark, and how to drop it."""
    if not port_open("127.0.0.1", 5432):
        return None
    import sqlalchemy as sa

    admin_url = os.environ.get(
        "QRPARK_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"qrpark_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="bigger, slower runs")
    parser.add_argument("--only", nargs="*", default=None, help="bench module names")
    args = parser.parse_args()
    quick = not args.full
    figures: list[Figure] = []
    failures = 0
    for name in args.only or BENCHES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue
            raise
        run = getattr(module, "run", None)
        if run is None:
            continue
        print(f"--- {name}", flush=True)
        started = time.perf_counter()
        try:
            figures += run(quick)
            if name in WITH_POSTGRES and (pg := postgres_database()) is not None:
                url, drop = pg
                try:
                    figures += run(quick, database_url=url, label="PostgreSQL")
                finally:
                    drop()
        except Exception:
            failures += 1
            traceback.print_exc()
        print(f"    ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(figures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
