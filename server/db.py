"""Engines, sessions, the aware-UTC column type and migrations (nothing built at import).

SQLite gets WAL, ``synchronous=NORMAL``, a busy timeout and real SAVEPOINT support (the
driver's own transaction handling is switched off and SQLAlchemy emits ``BEGIN IMMEDIATE``,
so a read-then-write transaction never fails on a lock upgrade). Pure reads go through
:func:`read_only` engines, whose transactions begin deferred: WAL readers then block neither
the writer nor each other. PostgreSQL is used as is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Dialect, Engine

__all__ = ["UTCDateTime", "make_engine", "read_only", "upgrade"]

_READ_ONLY = "qrpark_read_only"

MIGRATIONS = Path(__file__).parent / "migrations"


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC going in and coming out, on every database."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("naive datetime refused: use timezone-aware UTC")
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)  # stored as UTC text without an offset
        return value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # SQLite: the text SQLAlchemy's DATETIME stores ("2026-05-04 12:00:00.000000"), made
        # by one C call; the two processors chained made it from a dict of seven fields by
        # %-formatting, ~15 µs of a busy service's every event (docs/scaling.md).
        def process(value: datetime | None) -> str | None:
            utc = self.process_bind_param(value, dialect)
            return None if utc is None else utc.isoformat(" ", "microseconds")

        return process

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    """An engine for ``database_url`` with the pragmas and transaction mode we rely on."""
    url = sa.make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, **kwargs)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # The driver keeps prepared statements by SQL text, 128 by default: the event fast
    # path's queries at a few IN-list lengths, the ORM's and the API's overflowed it.
    connect_args = {"check_same_thread": False, "cached_statements": 512}
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SAVEPOINTs work)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # On the driver's connection: through exec_driver_sql this cost ~50 us of
        # SQLAlchemy's execution machinery per transaction, a busy service's every batch.
        driver = connection.connection.driver_connection
        assert driver is not None
        statement = (
            "BEGIN" if connection.get_execution_options().get(_READ_ONLY) else ("BEGIN IMMEDIATE")
        )
        try:
            driver.execute(statement)
        except sqlite3.Error as exc:  # "database is locked": as SQLAlchemy would raise it
            raise sa.exc.DBAPIError.instance(
                statement, (), exc, sqlite3.Error, dialect=connection.dialect
            ) from exc

    return engine


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool) for transactions that only read.

    On SQLite they begin deferred instead of taking the write lock; a write through it
    could fail with SQLITE_BUSY under contention, so use it for reads only.
    """
    return engine.execution_options(**{_READ_ONLY: True})


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """A programmatic Alembic config pointing at ``server/migrations`` (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(database: str | Engine, revision: str = "heads") -> None:
    """Run ``alembic upgrade heads`` on ``database`` (a URL or an engine).

    The migrations' environment (``server/migrations/env.py``) begins and commits their
    transaction itself, so a migration may step out of it (``autocommit_block``: an index
    built ``CONCURRENTLY`` on PostgreSQL)."""
    engine = make_engine(database) if isinstance(database, str) else database
    try:
        with engine.connect() as connection:
            command.upgrade(alembic_config(connection), revision)
            connection.commit()
    finally:
        if isinstance(database, str):
            engine.dispose()
