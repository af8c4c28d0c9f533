"""Merge the money and panel branches.

Revision ID: 0004
Revises: 0003_money, 0003_panel_auth
Create Date: 2026-11-23
"""

from collections.abc import Sequence

revision: str = "0004"
down_revision: str | Sequence[str] | None = ("0003_money", "0003_panel_auth")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
