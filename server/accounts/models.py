"""Tables for accounts, ledger transactions/postings and top-up idempotency; API schemas."""

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from parking_protocol.types import AccountId
from server.db import UTCDateTime

__all__ = [
    "Account",
    "AccountCreate",
    "AccountRead",
    "CodeRead",
    "LedgerTransaction",
    "Posting",
    "TopupCreate",
    "TopupRead",
    "TopupRequest",
]


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    account_id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    currency: str = Field(max_length=3)
    blocked: bool = False
    created_at: datetime = Field(sa_type=UTCDateTime)
    # How the account pays at exits: its prepaid wallet, or a card through a provider.
    payment_method: str = Field(
        default="wallet", max_length=16, sa_column_kwargs={"server_default": "wallet"}
    )
    card_token: str | None = Field(default=None, max_length=100)
    card_label: str | None = Field(default=None, max_length=100)


class LedgerTransaction(SQLModel, table=True):
    __tablename__ = "ledger_transactions"

    transaction_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=16)  # topup | charge | collect | refund
    account_id: str = Field(max_length=36, index=True)
    reference: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)


class Posting(SQLModel, table=True):
    """One signed line of a transaction; inserted, never updated or deleted."""

    __tablename__ = "ledger_postings"
    __table_args__ = (
        # Covers a balance (the sum of an account's postings by currency): summed from the
        # index alone, not row by row from the table.
        sa.Index("ix_ledger_postings_balance", "ledger_account", "currency", "amount_minor"),
    )

    posting_id: int | None = Field(default=None, primary_key=True)
    transaction_id: str = Field(
        max_length=64, foreign_key="ledger_transactions.transaction_id", index=True
    )
    ledger_account: str = Field(max_length=100)
    amount_minor: int = Field(sa_type=sa.BigInteger)
    currency: str = Field(max_length=3)


class TopupRequest(SQLModel, table=True):
    """An Idempotency-Key already used for a top-up, with the answer it got."""

    __tablename__ = "topup_requests"

    account_id: str = Field(primary_key=True, max_length=36)
    idempotency_key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    transaction_id: str = Field(max_length=64)
    response_json: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: AccountId | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = "CNY"


class AccountRead(BaseModel):
    account_id: str
    name: str
    currency: str
    blocked: bool
    balance_minor: int
    debt_minor: int = 0  # unpaid stays, collected at the next top-up or card charge
    payment_method: str = "wallet"
    card_label: str | None = None
    created_at: datetime


class TopupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: Annotated[int, PydanticField(gt=0, le=10**10, strict=True)]


class TopupRead(BaseModel):
    transaction_id: str
    account_id: str
    amount_minor: int
    currency: str
    balance_minor: int
    collected_minor: int = 0  # debts paid off from this top-up
    created_at: datetime
    method: str = "external"  # external (credited by an operator) | card (through a provider)
    provider_ref: str | None = None  # the card provider's capture reference


class CodeRead(BaseModel):
    code: str
    kid: str
    issued_at: datetime
    expires_at: datetime
