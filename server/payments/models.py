"""Tables for payments, refunds, idempotency records, permits and validations; API schemas."""

from datetime import datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, model_validator
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from parking_protocol.types import LotId, Money
from server.db import UTCDateTime
from server.pricing.models import LineItemRead, TariffInput

__all__ = [
    "MAX_TIME_OFF_MINUTES",
    "CardSet",
    "IdempotencyRecord",
    "Payment",
    "PaymentMethodRead",
    "PaymentRead",
    "Permit",
    "PermitCreate",
    "PermitRead",
    "ReceiptRead",
    "Refund",
    "RefundCreate",
    "RefundRead",
    "RefundsRead",
    "SessionPayCreate",
    "SessionPayRead",
    "StayQuoteRead",
    "Validation",
    "ValidationCreate",
    "ValidationRead",
]

Text = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class Payment(SQLModel, table=True):
    """Money collected for a stay (or promised: ``method == "debt"``), with its idempotency key.

    ``idempotency_key`` is unique: an exit event, an API request or a debt collection can
    create at most one payment, whatever is retried or redelivered.
    """

    __tablename__ = "payments"

    payment_id: str = Field(primary_key=True, max_length=64)
    idempotency_key: str = Field(max_length=250, unique=True)
    session_id: str | None = Field(default=None, max_length=64, index=True)
    account_id: str = Field(max_length=36, index=True)
    lot_id: str = Field(max_length=36)
    method: str = Field(max_length=16)  # wallet | card | debt
    status: str = Field(max_length=16)  # captured | owed | collected
    amount_minor: int = Field(sa_type=sa.BigInteger)
    currency: str = Field(max_length=3)
    provider_ref: str | None = Field(default=None, max_length=100)
    collects_payment_id: str | None = Field(default=None, max_length=64)
    transaction_id: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)


class Refund(SQLModel, table=True):
    """An operator's refund of (part of) a payment; the audit log records who and why."""

    __tablename__ = "refunds"

    refund_id: str = Field(primary_key=True, max_length=64)
    payment_id: str = Field(max_length=64, foreign_key="payments.payment_id", index=True)
    session_id: str | None = Field(default=None, max_length=64, index=True)
    amount_minor: int = Field(sa_type=sa.BigInteger)
    currency: str = Field(max_length=3)
    reason: str = Field(max_length=500)
    actor: str = Field(max_length=100)
    provider_ref: str | None = Field(default=None, max_length=100)
    transaction_id: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)


class IdempotencyRecord(SQLModel, table=True):
    """An Idempotency-Key already used in ``scope``, with the request's hash and the answer."""

    __tablename__ = "idempotency_records"

    scope: str = Field(primary_key=True, max_length=100)
    key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    response_json: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)


class Permit(SQLModel, table=True):
    """A season pass / whitelist entry: an account parks in some lots for a while."""

    __tablename__ = "permits"

    permit_id: str = Field(primary_key=True, max_length=64)
    account_id: str = Field(max_length=36, foreign_key="accounts.account_id", index=True)
    lot_ids: list[str] = Field(sa_type=sa.JSON)
    valid_from: datetime = Field(sa_type=UTCDateTime)
    valid_until: datetime = Field(sa_type=UTCDateTime)
    tariff_json: str | None = Field(default=None, sa_type=sa.Text, nullable=True)
    note: str = Field(default="", max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)


class Validation(SQLModel, table=True):
    """A merchant validation or discount code applied to a stay before it is settled."""

    __tablename__ = "validations"

    validation_id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(max_length=64, foreign_key="parking_sessions.session_id", index=True)
    kind: str = Field(max_length=16)  # time_off | amount_off | percent_off
    value: int = Field(sa_type=sa.BigInteger)
    reason: str = Field(max_length=200)
    merchant: str = Field(max_length=100)
    created_at: datetime = Field(sa_type=UTCDateTime)


# -- API schemas ------------------------------------------------------------------------------


class CardSet(BaseModel):
    """Pay exits by card (``card_token`` from the provider) or go back to the wallet.

    Sandbox tokens: ``tok_ok``, ``tok_decline``, ``tok_timeout``, ``tok_error``,
    ``tok_capture_fail``, ``tok_refund_fail``.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["wallet", "card"]
    card_token: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None

    @model_validator(mode="after")
    def _card_needs_token(self) -> "CardSet":
        if self.method == "card" and self.card_token is None:
            raise ValueError("a card needs card_token")
        return self


class PaymentMethodRead(BaseModel):
    account_id: str
    method: str
    card_label: str | None


class PaymentRead(BaseModel):
    payment_id: str
    session_id: str | None
    method: str
    status: str
    amount: Money
    refunded_minor: int
    created_at: datetime


class RefundCreate(BaseModel):
    """Refund part (``amount_minor``) or all (omitted) of what a stay was paid."""

    model_config = ConfigDict(extra="forbid")

    amount_minor: Annotated[int, PydanticField(gt=0, le=10**10, strict=True)] | None = None
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500)]
    actor: Annotated[str, StringConstraints(min_length=1, max_length=100)] = "operator"


class RefundRead(BaseModel):
    refund_id: str
    session_id: str | None
    payment_id: str
    amount: Money
    reason: str
    actor: str
    created_at: datetime


class RefundsRead(BaseModel):
    refunds: list[RefundRead]


class SessionPayCreate(BaseModel):
    """Pay an open stay now (in the app, before driving to the exit)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["wallet", "card"] | None = None  # default: the account's method


class PermitCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: Text
    lot_ids: Annotated[list[LotId], PydanticField(min_length=1, max_length=100)]
    valid_from: AwareDatetime
    valid_until: AwareDatetime
    tariff: TariffInput | None = None  # None: free inside the window
    note: Annotated[str, StringConstraints(max_length=500)] = ""

    @model_validator(mode="after")
    def _window(self) -> "PermitCreate":
        if self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self


class PermitRead(BaseModel):
    permit_id: str
    account_id: str
    lot_ids: list[str]
    valid_from: datetime
    valid_until: datetime
    tariff: dict[str, Any] | None
    note: str
    created_at: datetime


MAX_TIME_OFF_MINUTES = 366 * 24 * 60
"""The most minutes one ``time_off`` validation takes off (a year; pricing clamps anyway)."""


class ValidationCreate(BaseModel):
    """A merchant's validation: minutes off (at most 366 days), an amount off, or a
    percentage off."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["time_off", "amount_off", "percent_off"]
    value: Annotated[int, PydanticField(gt=0, le=10**9, strict=True)]
    reason: Text
    merchant: Text

    @model_validator(mode="after")
    def _bounded(self) -> "ValidationCreate":
        if self.kind == "percent_off" and self.value > 100:
            raise ValueError("percent_off is at most 100")
        if self.kind == "time_off" and self.value > MAX_TIME_OFF_MINUTES:
            raise ValueError(f"time_off is at most {MAX_TIME_OFF_MINUTES} minutes (366 days)")
        return self


class ValidationRead(BaseModel):
    validation_id: str
    session_id: str
    kind: str
    value: int
    reason: str
    merchant: str
    created_at: datetime


class ReceiptRead(BaseModel):
    """What a settled stay cost and how it was paid."""

    receipt_id: str
    session_id: str
    account_id: str
    lot_id: str
    lot_name: str
    entered_at: datetime
    exited_at: datetime | None
    duration_s: int | None
    tariff_version: int | None
    line_items: list[LineItemRead]
    amount: Money
    settlement: str | None
    payments: list[PaymentRead]
    refunds: list[RefundRead]
    refunded: Money
    outstanding: Money


class SessionPayRead(BaseModel):
    session_id: str
    status: str  # paid | free
    amount: Money
    method: str | None
    payment_id: str | None
    exit_by: datetime  # leave before this and the exit costs nothing more


class StayQuoteRead(BaseModel):
    """What an open stay would cost if it ended now."""

    session_id: str
    tariff_version: int
    at: datetime
    amount: Money
    due: Money
    line_items: list[LineItemRead]
