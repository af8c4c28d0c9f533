"""Alembic: an empty database migrates to head, twice is harmless, and the schema matches
the models exactly (so autogenerate would find nothing to do)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server.db import make_engine, upgrade
from server.tables import metadata

# Every table the models declare, and Alembic's own bookkeeping table.
EXPECTED_TABLES = {*metadata().tables, "alembic_version"}


@pytest.mark.usefixtures("database_url")
def test_empty_database_migrates_to_a_schema_matching_the_models(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)  # already at head: a no-op

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == EXPECTED_TABLES
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata()) == []
            indexes = {ix["name"]: ix for ix in sa.inspect(conn).get_indexes("parking_sessions")}
            assert indexes["uq_parking_sessions_one_open"]["unique"]
    finally:
        engine.dispose()


def test_sqlite_gets_wal_and_normal_sync(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
    finally:
        engine.dispose()
