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


@pytest.mark.usefixtures("database_url")
def test_the_covering_indexes_go_down_and_up_again(database_url: str) -> None:
    """0009 replaces two single-column indexes (concurrently on PostgreSQL): its downgrade
    brings them back, and upgrading again matches the models."""
    from alembic import command

    from server.db import alembic_config

    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            command.downgrade(alembic_config(conn), "0008_processed_command_id")
            conn.commit()
        with engine.connect() as conn:
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("parking_sessions")}
            assert "ix_parking_sessions_account_id" in names
            assert "ix_parking_sessions_account_state" not in names
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("ledger_postings")}
            assert names >= {"ix_ledger_postings_ledger_account"}
            assert "ix_ledger_postings_balance" not in names
        upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata()) == []
    finally:
        engine.dispose()


def test_timestamps_the_fast_path_stored_with_an_offset_are_rewritten_as_utc(
    sqlite_url: str,
) -> None:
    """0010: on SQLite, "…+00:00" and a gateway's "…+08:00" become the UTC text every
    other writer stores; UTC text is left as it is."""
    from alembic import command

    from server.db import alembic_config

    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "0009_covering_indexes")
            conn.commit()
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO used_nonces (nonce, account_id, event_id, used_at) VALUES"
                " ('a', 'x', 'e1', '2026-05-04 12:00:00+00:00'),"
                " ('b', 'x', 'e2', '2026-05-04 20:00:00.250000+08:00'),"
                " ('c', 'x', 'e3', '2026-05-04 07:30:00-04:30'),"
                " ('d', 'x', 'e4', '2026-05-04 12:00:00.000001')"
            )
        upgrade(engine)
        with engine.connect() as conn:
            stored = dict(conn.exec_driver_sql("SELECT nonce, used_at FROM used_nonces").all())
        assert stored == {
            "a": "2026-05-04 12:00:00.000000",
            "b": "2026-05-04 12:00:00.250000",
            "c": "2026-05-04 12:00:00.000000",
            "d": "2026-05-04 12:00:00.000001",
        }
    finally:
        engine.dispose()
