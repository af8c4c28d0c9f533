"""Transactions on SQLite begin on the driver's connection, with SQLAlchemy's errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from server import db as database


def test_a_locked_database_raises_sqlalchemys_operational_error(tmp_path: Path) -> None:
    engine = database.make_engine(f"sqlite:///{tmp_path}/locked.db")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with engine.connect() as conn:
                driver = conn.connection.driver_connection
                assert driver is not None
                driver.execute("PRAGMA busy_timeout=50")  # not the 10 s of production
                conn.rollback()
            with pytest.raises(sa.exc.OperationalError, match="locked"), engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            # Reads begin deferred: they go on beside the writer.
            with database.read_only(engine).begin() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with engine.begin() as conn:  # and the pool's connection works afterwards
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
            assert conn.exec_driver_sql("SELECT x FROM t").scalar_one() == 2
    finally:
        engine.dispose()
