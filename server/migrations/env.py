"""Alembic environment: the SQLModel metadata of server.tables, no alembic.ini needed.

Run through :func:`server.db.upgrade`, which passes an open connection in
``config.attributes["connection"]``; a ``sqlalchemy.url`` main option works too.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from server.db import make_engine
from server.tables import metadata

config = context.config
target_metadata = metadata()


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
