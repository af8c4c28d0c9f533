"""Data access for accounts and the ledger: balances are sums of postings, never a column."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.accounts import book
from server.accounts.ledger import (
    TOPUP_SOURCE,
    charge_postings,
    debt_account,
    topup_postings,
    wallet_account,
)
from server.accounts.models import (
    Account,
    AccountCreate,
    AccountRead,
    TopupRead,
    TopupRequest,
)
from server.errors import ConflictError, NotFoundError, UnprocessableError
from server.payments import debts

__all__ = [
    "TopupOutcome",
    "account_read",
    "balance",
    "charge",
    "commit_topup",
    "create_account",
    "credit_wallet",
    "debt",
    "find_topup",
    "get_account",
    "lock_account",
    "require_account",
    "set_blocked",
    "stage_topup",
    "topup",
    "topup_request_hash",
]


def get_account(db: Session, account_id: str) -> Account | None:
    return db.get(Account, account_id)


def require_account(db: Session, account_id: str) -> Account:
    account = db.get(Account, account_id)
    if account is None:
        raise NotFoundError(f"account {account_id!r} not found")
    return account


def lock_account(db: Session, account_id: str) -> Account | None:
    """The account's row, locked until the transaction ends and re-read.

    Whatever spends or credits a wallet takes this lock before reading the balance it
    decides on: on PostgreSQL two spenders of one wallet then wait for each other instead
    of both seeing the same money. Stays are locked before it, never after (the stay being
    paid, then the stays of the debts to be collected, by ``session_id``): see
    :func:`server.payments.debts.lock_stays`.
    """
    return db.exec(
        select(Account)
        .where(col(Account.account_id) == account_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def balance(db: Session, account_id: str, currency: str) -> int:
    """The wallet balance in minor units: the sum of its postings in ``currency``."""
    return book.balance_of(db, wallet_account(account_id), currency)


def debt(db: Session, account_id: str, currency: str) -> int:
    """What the driver owes (positive), from the postings of their debt account."""
    return -book.balance_of(db, debt_account(account_id), currency)


def account_read(db: Session, account: Account) -> AccountRead:
    return AccountRead(
        account_id=account.account_id,
        name=account.name,
        currency=account.currency,
        blocked=account.blocked,
        balance_minor=balance(db, account.account_id, account.currency),
        debt_minor=debt(db, account.account_id, account.currency),
        payment_method=account.payment_method,
        card_label=account.card_label,
        created_at=account.created_at,
    )


def create_account(db: Session, data: AccountCreate, *, now: datetime) -> Account:
    account_id = data.account_id or uuid.uuid4().hex[:16]
    if db.get(Account, account_id) is not None:
        raise ConflictError(f"account {account_id!r} already exists")
    account = Account(account_id=account_id, name=data.name, currency=data.currency, created_at=now)
    db.add(account)
    try:
        db.flush()
    except IntegrityError:
        raise ConflictError(f"account {account_id!r} already exists") from None
    return account


def set_blocked(db: Session, account_id: str, blocked: bool) -> Account:
    account = require_account(db, account_id)
    account.blocked = blocked
    db.add(account)
    db.flush()
    return account


def charge(
    db: Session,
    *,
    account_id: str,
    lot_id: str,
    amount_minor: int,
    currency: str,
    reference: str,
    now: datetime,
) -> str:
    """Move a parking fee from the wallet to the lot's revenue."""
    return book.post(
        db,
        kind="charge",
        account_id=account_id,
        postings=charge_postings(account_id, lot_id, amount_minor),
        currency=currency,
        reference=reference,
        now=now,
    )


@dataclass(frozen=True, slots=True)
class TopupOutcome:
    response: TopupRead
    replayed: bool


def topup_request_hash(account_id: str, amount_minor: int, **extra: str) -> str:
    """What a top-up's Idempotency-Key is bound to: the account, the amount (and ``extra``)."""
    body = json.dumps(
        {"account_id": account_id, "amount_minor": amount_minor, **extra}, sort_keys=True
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _replay(existing: TopupRequest, request_hash: str) -> TopupOutcome:
    if existing.request_hash != request_hash:
        raise UnprocessableError("Idempotency-Key was already used with a different request body")
    return TopupOutcome(TopupRead.model_validate_json(existing.response_json), replayed=True)


def find_topup(
    db: Session, account_id: str, idempotency_key: str, request_hash: str
) -> TopupOutcome | None:
    """The stored answer to the key (a replay), None if the key is new; another body: 422."""
    existing = db.get(TopupRequest, (account_id, idempotency_key))
    return None if existing is None else _replay(existing, request_hash)


def topup(
    db: Session, account_id: str, amount_minor: int, *, idempotency_key: str, now: datetime
) -> TopupOutcome:
    """Credit a wallet once per Idempotency-Key; the same key replays the first answer.

    Debts (unpaid stays) are collected from the new balance, oldest first. Commits: the key,
    the ledger transactions and the stored answer go in one transaction.
    """
    request_hash = topup_request_hash(account_id, amount_minor)
    outcome = stage_topup(
        db,
        account_id,
        amount_minor,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        now=now,
    )
    return commit_topup(db, outcome, idempotency_key=idempotency_key, request_hash=request_hash)


def stage_topup(
    db: Session,
    account_id: str,
    amount_minor: int,
    *,
    idempotency_key: str,
    request_hash: str,
    now: datetime,
    source: str = TOPUP_SOURCE,
    method: str = "external",
    provider_ref: str | None = None,
) -> TopupOutcome:
    """Post ``source`` -> wallet, collect debts and store the answer, uncommitted (a replay if
    the key was used): the caller adds what belongs with it and calls :func:`commit_topup`.

    Locks the stays of the account's debts (collecting one updates its stay), then the
    account, so debts are collected from a settled balance without inverting the lock
    order of a refund (stay, then account)."""
    locked = debts.lock_stays(db, account_id)
    account = lock_account(db, account_id)
    if account is None:
        raise NotFoundError(f"account {account_id!r} not found")
    replay = find_topup(db, account_id, idempotency_key, request_hash)
    if replay is not None:
        return replay
    transaction_id = book.post(
        db,
        kind="topup",
        account_id=account_id,
        postings=topup_postings(account_id, amount_minor, source),
        currency=account.currency,
        reference=f"topup:{idempotency_key}",
        now=now,
    )
    collected = debts.collect_from_wallet(db, account, now=now, locked=locked)
    response = TopupRead(
        transaction_id=transaction_id,
        account_id=account_id,
        amount_minor=amount_minor,
        currency=account.currency,
        balance_minor=balance(db, account_id, account.currency),
        collected_minor=collected,
        created_at=now,
        method=method,
        provider_ref=provider_ref,
    )
    db.add(
        TopupRequest(
            account_id=account_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            transaction_id=transaction_id,
            response_json=response.model_dump_json(),
            created_at=now,
        )
    )
    return TopupOutcome(response, replayed=False)


def credit_wallet(
    db: Session,
    account: Account,
    amount_minor: int,
    *,
    source: str,
    key: str,
    provider_ref: str | None,
    now: datetime,
) -> str:
    """Credit ``amount_minor`` from ``source`` (a card's clearing) to the wallet, recorded as
    a card top-up under ``key`` (so it is listed and audited like one); debts are left for
    the next top-up or charge. Uncommitted; returns the ledger transaction id."""
    transaction_id = book.post(
        db,
        kind="topup",
        account_id=account.account_id,
        postings=topup_postings(account.account_id, amount_minor, source),
        currency=account.currency,
        reference=f"topup:{key}",
        now=now,
    )
    response = TopupRead(
        transaction_id=transaction_id,
        account_id=account.account_id,
        amount_minor=amount_minor,
        currency=account.currency,
        balance_minor=balance(db, account.account_id, account.currency),
        created_at=now,
        method="card",
        provider_ref=provider_ref,
    )
    db.add(
        TopupRequest(
            account_id=account.account_id,
            idempotency_key=key[:200],
            request_hash=topup_request_hash(account.account_id, amount_minor, credit=key),
            transaction_id=transaction_id,
            response_json=response.model_dump_json(),
            created_at=now,
        )
    )
    db.flush()
    return transaction_id


def commit_topup(
    db: Session, outcome: TopupOutcome, *, idempotency_key: str, request_hash: str
) -> TopupOutcome:
    """Commit a staged top-up; if the same key raced in from another request, its answer is
    the answer (this one's postings are rolled back)."""
    if outcome.replayed:
        return outcome
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        account_id = outcome.response.account_id
        raced = find_topup(db, account_id, idempotency_key, request_hash)
        if raced is None:
            raise
        return raced
    return outcome
