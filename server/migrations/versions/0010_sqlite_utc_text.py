"""Rewrite, on SQLite, the timestamps the event fast path stored in the wrong text form.

Until this release the fast path handed its timestamps to the SQLite driver without the
columns' conversion, so they were stored as ``2026-05-04 12:00:00+00:00`` (a gateway's
local offset, such as ``+08:00``, kept as sent) where every other writer stores UTC as
``2026-05-04 12:00:00.000000``. SQLite compares and orders that text as text: equal
instants compared unequal and a local offset shifted the stored time by hours. Each such
value is rewritten as the UTC text of the same instant. Other databases store timestamps
as timestamps; there is nothing to do. The old form is not written again, so there is
nothing to undo.

Revision ID: 0010_sqlite_utc_text
Revises: 0009_covering_indexes
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from datetime import UTC, datetime

from alembic import op

revision: str = "0010_sqlite_utc_text"
down_revision: str | Sequence[str] | None = "0009_covering_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the fast path writes (server/sessions/fastpath.py: its inserts and its closes).
COLUMNS = {
    "parking_sessions": ("entered_at", "exited_at", "prepaid_at"),
    "used_nonces": ("used_at",),
    "ledger_transactions": ("created_at",),
    "payments": ("created_at",),
    "processed_events": ("processed_at",),
}


def utc_text(value: str) -> str:
    """``2026-05-04 20:00:00.5+08:00`` -> ``2026-05-04 12:00:00.500000``."""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            # An offset ends the text: "+hh:mm" or "-hh:mm" (UTC text ends in digits).
            rows = bind.exec_driver_sql(
                f"SELECT rowid, {column} FROM {table}"  # noqa: S608 - our own names
                f" WHERE {column} LIKE '%+__:__' OR {column} LIKE '%-__:__'"
            ).all()
            if rows:
                bind.exec_driver_sql(
                    f"UPDATE {table} SET {column} = ? WHERE rowid = ?",  # noqa: S608
                    [(utc_text(text), rowid) for rowid, text in rows],
                )


def downgrade() -> None:
    pass
