"""Initial schema: lots, gates, accounts + ledger, sessions, idempotency, dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('account_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('blocked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('account_id')
    )
    op.create_table('command_replies',
    sa.Column('reply_id', sa.String(length=64), nullable=False),
    sa.Column('command_id', sa.String(length=64), nullable=False),
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('gate_id', sa.String(length=36), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('reply_id')
    )
    op.create_index(op.f('ix_command_replies_command_id'), 'command_replies', ['command_id'], unique=False)

    op.create_table('dead_letters',
    sa.Column('dead_letter_id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=True),
    sa.Column('topic', sa.String(length=300), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('dead_letter_id')
    )
    op.create_index(op.f('ix_dead_letters_event_id'), 'dead_letters', ['event_id'], unique=False)

    op.create_table('gateway_status',
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('gate_id', sa.String(length=36), nullable=False),
    sa.Column('status_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=True),
    sa.Column('firmware_version', sa.String(length=200), nullable=False),
    sa.Column('boot', sa.BigInteger(), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queue_depth', sa.Integer(), nullable=False),
    sa.Column('camera_fps', sa.Float(), nullable=True),
    sa.Column('last_decode_ms', sa.Float(), nullable=True),
    sa.Column('last_error', sa.String(length=200), nullable=True),
    sa.PrimaryKeyConstraint('lot_id', 'gate_id')
    )
    op.create_table('ledger_transactions',
    sa.Column('transaction_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('account_id', sa.String(length=36), nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('transaction_id')
    )
    op.create_index(op.f('ix_ledger_transactions_account_id'), 'ledger_transactions', ['account_id'], unique=False)

    op.create_table('lots',
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('grace_minutes', sa.Integer(), nullable=False),
    sa.Column('hourly_minor', sa.BigInteger(), nullable=False),
    sa.Column('daily_cap_minor', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('lot_id')
    )
    op.create_table('processed_events',
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('gate_id', sa.String(length=36), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('boot', sa.BigInteger(), nullable=False),
    sa.Column('reply_json', sa.Text(), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    op.create_table('topup_requests',
    sa.Column('account_id', sa.String(length=36), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.String(length=64), nullable=False),
    sa.Column('response_json', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('account_id', 'idempotency_key')
    )
    op.create_table('used_nonces',
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=36), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('nonce')
    )
    op.create_table('gates',
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('gate_id', sa.String(length=36), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lot_id'], ['lots.lot_id'], ),
    sa.PrimaryKeyConstraint('lot_id', 'gate_id')
    )
    op.create_table('ledger_postings',
    sa.Column('posting_id', sa.Integer(), nullable=False),
    sa.Column('transaction_id', sa.String(length=64), nullable=False),
    sa.Column('ledger_account', sa.String(length=100), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.ForeignKeyConstraint(['transaction_id'], ['ledger_transactions.transaction_id'], ),
    sa.PrimaryKeyConstraint('posting_id')
    )
    op.create_index(op.f('ix_ledger_postings_ledger_account'), 'ledger_postings', ['ledger_account'], unique=False)
    op.create_index(op.f('ix_ledger_postings_transaction_id'), 'ledger_postings', ['transaction_id'], unique=False)

    op.create_table('parking_sessions',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=36), nullable=False),
    sa.Column('lot_id', sa.String(length=36), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('entry_gate_id', sa.String(length=36), nullable=False),
    sa.Column('entry_event_id', sa.String(length=64), nullable=False),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('offline_entry', sa.Boolean(), nullable=False),
    sa.Column('exit_gate_id', sa.String(length=36), nullable=True),
    sa.Column('exit_event_id', sa.String(length=64), nullable=True),
    sa.Column('exited_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('offline_exit', sa.Boolean(), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('settlement', sa.String(length=8), nullable=True),
    sa.Column('charge_transaction_id', sa.String(length=64), nullable=True),
    sa.Column('quote_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.account_id'], ),
    sa.ForeignKeyConstraint(['lot_id'], ['lots.lot_id'], ),
    sa.PrimaryKeyConstraint('session_id')
    )
    op.create_index(op.f('ix_parking_sessions_account_id'), 'parking_sessions', ['account_id'], unique=False)
    op.create_index('ix_parking_sessions_lot_state', 'parking_sessions', ['lot_id', 'state'], unique=False)
    op.create_index('uq_parking_sessions_one_open', 'parking_sessions', ['account_id', 'lot_id'], unique=True, sqlite_where=sa.text("state = 'open'"), postgresql_where=sa.text("state = 'open'"))



def downgrade() -> None:
    op.drop_index('uq_parking_sessions_one_open', table_name='parking_sessions', sqlite_where=sa.text("state = 'open'"), postgresql_where=sa.text("state = 'open'"))
    op.drop_index('ix_parking_sessions_lot_state', table_name='parking_sessions')
    op.drop_index(op.f('ix_parking_sessions_account_id'), table_name='parking_sessions')

    op.drop_table('parking_sessions')
    op.drop_index(op.f('ix_ledger_postings_transaction_id'), table_name='ledger_postings')
    op.drop_index(op.f('ix_ledger_postings_ledger_account'), table_name='ledger_postings')

    op.drop_table('ledger_postings')
    op.drop_table('gates')
    op.drop_table('used_nonces')
    op.drop_table('topup_requests')
    op.drop_table('processed_events')
    op.drop_table('lots')
    op.drop_index(op.f('ix_ledger_transactions_account_id'), table_name='ledger_transactions')

    op.drop_table('ledger_transactions')
    op.drop_table('gateway_status')
    op.drop_index(op.f('ix_dead_letters_event_id'), table_name='dead_letters')

    op.drop_table('dead_letters')
    op.drop_index(op.f('ix_command_replies_command_id'), table_name='command_replies')

    op.drop_table('command_replies')
    op.drop_table('accounts')
