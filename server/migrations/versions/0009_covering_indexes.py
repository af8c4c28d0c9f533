"""Covering indexes for the two reads an exit makes of a driver's whole history: the
latest closed stay per lot and the wallet balance. They replace the single-column indexes
on ``parking_sessions.account_id`` and ``ledger_postings.ledger_account`` (their first
column).

On PostgreSQL the indexes are built and dropped ``CONCURRENTLY``, outside the migration's
transaction: a plain ``CREATE INDEX`` would hold every exit and charge (writes to both
tables) until it finished, on a large ledger an outage.

Revision ID: 0009_covering_indexes
Revises: 0008_processed_command_id
Create Date: 2026-12-01
"""

import contextlib
from collections.abc import Iterator, Sequence

from alembic import op

revision: str = "0009_covering_indexes"
down_revision: str | Sequence[str] | None = "0008_processed_command_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SESSIONS = ["account_id", "state", "lot_id", "entered_at", "lost_ticket"]
_POSTINGS = ["ledger_account", "currency", "amount_minor"]


@contextlib.contextmanager
def _online() -> Iterator[dict[str, bool]]:
    """Outside the transaction, with ``postgresql_concurrently``, on PostgreSQL."""
    context = op.get_context()
    if context.dialect.name != "postgresql":
        yield {}
        return
    with context.autocommit_block():
        yield {"postgresql_concurrently": True}


def upgrade() -> None:
    with _online() as kw:
        op.create_index("ix_parking_sessions_account_state", "parking_sessions", _SESSIONS, **kw)
        op.drop_index("ix_parking_sessions_account_id", table_name="parking_sessions", **kw)
        op.create_index("ix_ledger_postings_balance", "ledger_postings", _POSTINGS, **kw)
        op.drop_index("ix_ledger_postings_ledger_account", table_name="ledger_postings", **kw)


def downgrade() -> None:
    with _online() as kw:
        op.create_index(
            "ix_ledger_postings_ledger_account", "ledger_postings", ["ledger_account"], **kw
        )
        op.drop_index("ix_ledger_postings_balance", table_name="ledger_postings", **kw)
        op.create_index("ix_parking_sessions_account_id", "parking_sessions", ["account_id"], **kw)
        op.drop_index("ix_parking_sessions_account_state", table_name="parking_sessions", **kw)
