"""Covering indexes for the two reads an exit makes of a driver's whole history: the
latest closed stay per lot and the wallet balance. They replace the single-column indexes
on ``parking_sessions.account_id`` and ``ledger_postings.ledger_account`` (their first
column).

Revision ID: 0009_covering_indexes
Revises: 0008_processed_command_id
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_covering_indexes"
down_revision: str | Sequence[str] | None = "0008_processed_command_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_parking_sessions_account_state",
        "parking_sessions",
        ["account_id", "state", "lot_id", "entered_at", "lost_ticket"],
    )
    op.drop_index("ix_parking_sessions_account_id", table_name="parking_sessions")
    op.create_index(
        "ix_ledger_postings_balance",
        "ledger_postings",
        ["ledger_account", "currency", "amount_minor"],
    )
    op.drop_index("ix_ledger_postings_ledger_account", table_name="ledger_postings")


def downgrade() -> None:
    op.create_index("ix_ledger_postings_ledger_account", "ledger_postings", ["ledger_account"])
    op.drop_index("ix_ledger_postings_balance", table_name="ledger_postings")
    op.create_index("ix_parking_sessions_account_id", "parking_sessions", ["account_id"])
    op.drop_index("ix_parking_sessions_account_state", table_name="parking_sessions")
