"""The ledger in the database: post a balanced transaction, read a balance. Nothing else.

Postings are inserted, never updated or deleted (an ORM guard refuses both); a balance is
always ``SUM(amount_minor)`` over an account's postings.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlmodel import Session, select

from parking_protocol.messages import new_id
from server.accounts.ledger import PostingSpec, assert_balanced
from server.accounts.models import LedgerTransaction, Posting

__all__ = ["balance_of", "post"]


@sa.event.listens_for(Posting, "before_update")
@sa.event.listens_for(Posting, "before_delete")
def _postings_are_append_only(
    _mapper: Mapper[Posting], _conn: sa.Connection, target: Posting
) -> None:
    raise RuntimeError(f"ledger posting {target.posting_id} must never be changed or deleted")


def balance_of(db: Session, ledger_account: str, currency: str) -> int:
    """The sum of ``ledger_account``'s postings in ``currency`` (minor units)."""
    total = db.exec(
        select(sa.func.coalesce(sa.func.sum(Posting.amount_minor), 0)).where(
            Posting.ledger_account == ledger_account, Posting.currency == currency
        )
    ).one()
    return int(total)


def post(
    db: Session,
    *,
    kind: str,
    account_id: str,
    postings: Sequence[PostingSpec],
    currency: str,
    reference: str | None,
    now: datetime,
) -> str:
    """Insert one balanced transaction and its postings; returns the transaction id."""
    assert_balanced(postings)
    transaction_id = new_id()
    db.add(
        LedgerTransaction(
            transaction_id=transaction_id,
            kind=kind,
            account_id=account_id,
            reference=reference,
            created_at=now,
        )
    )
    db.add_all(
        Posting(
            transaction_id=transaction_id,
            ledger_account=spec.ledger_account,
            amount_minor=spec.amount_minor,
            currency=currency,
        )
        for spec in postings
    )
    return transaction_id  # flushed with the caller's next flush (inserts ordered by FK)
