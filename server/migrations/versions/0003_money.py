"""Money: tariff versions, payments, refunds, idempotency records, permits, validations;
payment method on accounts, payment policy on lots, pricing facts on sessions.

Existing lots get tariff version 1 from their simple tariff (effective from their creation).

Revision ID: 0003_money
Revises: 0002
Create Date: 2026-11-23
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_money"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tariff_versions",
        sa.Column("lot_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.lot_id"]),
        sa.PrimaryKeyConstraint("lot_id", "version"),
    )
    op.create_table(
        "payments",
        sa.Column("payment_id", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=250), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("lot_id", sa.String(length=36), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("provider_ref", sa.String(length=100), nullable=True),
        sa.Column("collects_payment_id", sa.String(length=64), nullable=True),
        sa.Column("transaction_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("payment_id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index("ix_payments_session_id", "payments", ["session_id"])
    op.create_index("ix_payments_account_id", "payments", ["account_id"])
    op.create_table(
        "refunds",
        sa.Column("refund_id", sa.String(length=64), nullable=False),
        sa.Column("payment_id", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("provider_ref", sa.String(length=100), nullable=True),
        sa.Column("transaction_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["payment_id"], ["payments.payment_id"]),
        sa.PrimaryKeyConstraint("refund_id"),
    )
    op.create_index("ix_refunds_payment_id", "refunds", ["payment_id"])
    op.create_index("ix_refunds_session_id", "refunds", ["session_id"])
    op.create_table(
        "idempotency_records",
        sa.Column("scope", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key"),
    )
    op.create_table(
        "permits",
        sa.Column("permit_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("lot_ids", sa.JSON(), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tariff_json", sa.Text(), nullable=True),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"]),
        sa.PrimaryKeyConstraint("permit_id"),
    )
    op.create_index("ix_permits_account_id", "permits", ["account_id"])
    op.create_table(
        "validations",
        sa.Column("validation_id", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("merchant", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["parking_sessions.session_id"]),
        sa.PrimaryKeyConstraint("validation_id"),
    )
    op.create_index("ix_validations_session_id", "validations", ["session_id"])

    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("payment_method", sa.String(length=16), nullable=False, server_default="wallet")
        )
        batch.add_column(sa.Column("card_token", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("card_label", sa.String(length=100), nullable=True))
    with op.batch_alter_table("lots") as batch:
        batch.add_column(
            sa.Column(
                "payment_policy", sa.String(length=16), nullable=False, server_default="pay_on_exit"
            )
        )
    with op.batch_alter_table("parking_sessions") as batch:
        batch.add_column(sa.Column("tariff_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("payment_method", sa.String(length=16), nullable=True))
        batch.add_column(
            sa.Column("prepaid_minor", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("prepaid_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("lost_ticket", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    # Every existing lot's simple tariff becomes its version 1.
    connection = op.get_bind()
    lots = connection.execute(
        sa.text(
            "SELECT lot_id, grace_minutes, hourly_minor, daily_cap_minor, currency, created_at"
            " FROM lots"
        )
    ).all()
    insert = sa.text(
        "INSERT INTO tariff_versions (lot_id, version, effective_from, spec_json, note, created_at)"
        " VALUES (:lot_id, 1, :at, :spec, 'migrated simple tariff', :at)"
    )
    for lot_id, grace, hourly, cap, currency, created_at in lots:
        spec = {
            "currency": currency,
            "grace_minutes": grace,
            "first_period_minutes": 0,
            "first_period_minor": 0,
            "increment_minutes": 60,
            "increment_minor": hourly,
            "daily_cap_minor": cap,
            "cap_period": "rolling_24h",
            "bands": [],
            "max_per_stay_minor": None,
            "exit_grace_minutes": 15,
            "lost_ticket_minor": None,
        }
        # created_at goes back exactly as stored (text on SQLite, a timestamp on PostgreSQL)
        connection.execute(insert, {"lot_id": lot_id, "at": created_at, "spec": json.dumps(spec)})


def downgrade() -> None:
    with op.batch_alter_table("parking_sessions") as batch:
        for column in ("lost_ticket", "prepaid_at", "prepaid_minor", "payment_method", "tariff_version"):
            batch.drop_column(column)
    with op.batch_alter_table("lots") as batch:
        batch.drop_column("payment_policy")
    with op.batch_alter_table("accounts") as batch:
        for column in ("card_label", "card_token", "payment_method"):
            batch.drop_column(column)
    for table in ("validations", "permits", "idempotency_records", "refunds", "payments", "tariff_versions"):
        op.drop_table(table)
