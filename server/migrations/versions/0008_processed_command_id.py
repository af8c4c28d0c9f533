"""The command each processed scan was answered with, to act on the gate's reply to it.

Revision ID: 0008_processed_command_id
Revises: 0007_dead_letters_resolved
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_processed_command_id"
down_revision: str | Sequence[str] | None = "0007_dead_letters_resolved"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.add_column(sa.Column("command_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_processed_events_command_id", ["command_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("processed_events") as batch:
        batch.drop_index("ix_processed_events_command_id")
        batch.drop_column("command_id")
