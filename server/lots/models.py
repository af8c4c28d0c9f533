"""The ``lots`` table and the lot API schemas."""

from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from parking_protocol.types import LotId
from server.db import UTCDateTime
from server.pricing.models import TariffInput, TariffSchema

__all__ = ["Lot", "LotCreate", "LotRead", "Occupancy", "PaymentPolicy", "TariffSchema"]

PaymentPolicy = Literal["pay_on_exit", "pay_later"]
"""``pay_on_exit``: the exit opens only once paid. ``pay_later``: the exit always opens and
an unpaid stay becomes a debt, collected at the next top-up or card charge."""


class Lot(SQLModel, table=True):
    __tablename__ = "lots"

    lot_id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    capacity: int
    timezone: str = Field(max_length=64)
    # The shorthand of the first tariff version (kept for old readers; versions rule).
    grace_minutes: int
    hourly_minor: int = Field(sa_type=sa.BigInteger)
    daily_cap_minor: int | None = Field(default=None, sa_type=sa.BigInteger, nullable=True)
    currency: str = Field(max_length=3)
    payment_policy: str = Field(
        default="pay_on_exit", max_length=16, sa_column_kwargs={"server_default": "pay_on_exit"}
    )
    created_at: datetime = Field(sa_type=UTCDateTime)


class LotCreate(BaseModel):
    """A lot; ``tariff`` (full or shorthand) becomes its tariff version 1."""

    model_config = ConfigDict(extra="forbid")

    lot_id: LotId
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    capacity: Annotated[int, PydanticField(ge=1, le=1_000_000)]
    timezone: str = "Asia/Shanghai"
    tariff: TariffInput = TariffSchema()
    payment_policy: PaymentPolicy = "pay_on_exit"

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class Occupancy(BaseModel):
    open_sessions: int
    capacity: int
    full: bool


class LotRead(BaseModel):
    lot_id: str
    name: str
    capacity: int
    timezone: str
    tariff: TariffSchema  # shorthand summary of the version in force now
    tariff_version: int
    payment_policy: PaymentPolicy
    occupancy: Occupancy
    created_at: datetime
