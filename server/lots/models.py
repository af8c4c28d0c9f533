"""The ``lots`` table and the lot API schemas."""

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from parking_protocol.types import LotId
from server.db import UTCDateTime
from server.pricing.engine import Tariff

__all__ = ["Lot", "LotCreate", "LotRead", "Occupancy", "TariffSchema"]

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]


class Lot(SQLModel, table=True):
    __tablename__ = "lots"

    lot_id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=200)
    capacity: int
    timezone: str = Field(max_length=64)
    grace_minutes: int
    hourly_minor: int = Field(sa_type=sa.BigInteger)
    daily_cap_minor: int | None = Field(default=None, sa_type=sa.BigInteger, nullable=True)
    currency: str = Field(max_length=3)
    created_at: datetime = Field(sa_type=UTCDateTime)

    def tariff(self) -> Tariff:
        return Tariff(
            grace_minutes=self.grace_minutes,
            hourly_minor=self.hourly_minor,
            daily_cap_minor=self.daily_cap_minor,
            currency=self.currency,
        )


class TariffSchema(BaseModel):
    """The lot's simple tariff (amounts in integer minor units)."""

    model_config = ConfigDict(extra="forbid")

    grace_minutes: Annotated[int, PydanticField(ge=0, le=24 * 60)] = 15
    hourly_minor: Annotated[int, PydanticField(ge=0, le=10**9)] = 500
    daily_cap_minor: Annotated[int, PydanticField(ge=0, le=10**10)] | None = 6000
    currency: Currency = "CNY"


class LotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lot_id: LotId
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    capacity: Annotated[int, PydanticField(ge=1, le=1_000_000)]
    timezone: str = "Asia/Shanghai"
    tariff: TariffSchema = TariffSchema()

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
    tariff: TariffSchema
    occupancy: Occupancy
    created_at: datetime
