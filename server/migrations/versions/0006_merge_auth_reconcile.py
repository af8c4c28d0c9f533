"""Merge the API-authentication and offline-reconciliation branches.

Revision ID: 0006
Revises: 0005_api_auth, 0005_reconcile_offline
Create Date: 2026-11-23
"""

from collections.abc import Sequence

revision: str = "0006"
down_revision: str | Sequence[str] | None = ("0005_api_auth", "0005_reconcile_offline")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
