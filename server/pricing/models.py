"""Tariff versions (table) and the tariff API schemas.

A tariff is written either in full (:class:`TariffSpec`) or as the spine's shorthand
(:class:`TariffSchema`: grace, an hourly rate and a cap per rolling 24 h); both become the
same engine :class:`~server.pricing.engine.Tariff`.
"""

from datetime import datetime, time
from typing import Annotated, Literal

import sqlalchemy as sa
from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, model_validator
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from parking_protocol.types import Money
from server.db import UTCDateTime
from server.pricing.engine import Band, CapPeriod, Tariff

__all__ = [
    "BandSpec",
    "LineItemRead",
    "QuotePreview",
    "QuoteRead",
    "TariffInput",
    "TariffSchema",
    "TariffSpec",
    "TariffVersion",
    "TariffVersionCreate",
    "TariffVersionRead",
]

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Minor = Annotated[int, PydanticField(ge=0, le=10**10, strict=True)]
Minutes = Annotated[int, PydanticField(ge=0, le=7 * 24 * 60, strict=True)]


class TariffVersion(SQLModel, table=True):
    """One immutable version of a lot's tariff; the version in force at entry prices a stay."""

    __tablename__ = "tariff_versions"

    lot_id: str = Field(primary_key=True, max_length=36, foreign_key="lots.lot_id")
    version: int = Field(primary_key=True)
    effective_from: datetime = Field(sa_type=UTCDateTime)
    spec_json: str = Field(sa_type=sa.Text)
    note: str = Field(default="", max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)


class TariffSchema(BaseModel):
    """The shorthand tariff: grace, every started hour, a cap per rolling 24 h."""

    model_config = ConfigDict(extra="forbid")

    grace_minutes: Annotated[int, PydanticField(ge=0, le=24 * 60)] = 15
    hourly_minor: Annotated[int, PydanticField(ge=0, le=10**9)] = 500
    daily_cap_minor: Annotated[int, PydanticField(ge=0, le=10**10)] | None = 6000
    currency: Currency = "CNY"

    def full(self) -> "TariffSpec":
        return TariffSpec(
            currency=self.currency,
            grace_minutes=self.grace_minutes,
            increment_minutes=60,
            increment_minor=self.hourly_minor,
            daily_cap_minor=self.daily_cap_minor,
            cap_period=CapPeriod.ROLLING_24H,
        )


class BandSpec(BaseModel):
    """A time-of-day / weekday band, e.g. ``{"name": "night", "start": "22:00", "end": "07:00",
    "increment_minor": 100, "cap_minor": 1000}`` (weekdays 0 = Monday ... 6 = Sunday)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    start: time
    end: time
    increment_minor: Minor
    weekdays: Annotated[
        list[Annotated[int, PydanticField(ge=0, le=6)]], PydanticField(min_length=1)
    ] = [0, 1, 2, 3, 4, 5, 6]
    cap_minor: Minor | None = None

    def band(self) -> Band:
        return Band(
            name=self.name,
            start=self.start.replace(tzinfo=None),
            end=self.end.replace(tzinfo=None),
            increment_minor=self.increment_minor,
            weekdays=frozenset(self.weekdays),
            cap_minor=self.cap_minor,
        )


class TariffSpec(BaseModel):
    """A full tariff (amounts in integer minor units; times in the lot's zone)."""

    model_config = ConfigDict(extra="forbid")

    currency: Currency = "CNY"
    grace_minutes: Minutes = 15
    first_period_minutes: Minutes = 0
    first_period_minor: Minor = 0
    increment_minutes: Literal[15, 30, 60] = 60
    increment_minor: Minor = 500
    daily_cap_minor: Minor | None = 6000
    cap_period: CapPeriod = CapPeriod.ROLLING_24H
    bands: Annotated[list[BandSpec], PydanticField(max_length=16)] = []
    max_per_stay_minor: Minor | None = None
    exit_grace_minutes: Minutes = 15
    lost_ticket_minor: Minor | None = None

    def tariff(self, timezone: str) -> Tariff:
        return Tariff(
            currency=self.currency,
            timezone=timezone,
            grace_minutes=self.grace_minutes,
            first_period_minutes=self.first_period_minutes,
            first_period_minor=self.first_period_minor,
            increment_minutes=self.increment_minutes,
            increment_minor=self.increment_minor,
            daily_cap_minor=self.daily_cap_minor,
            cap_period=self.cap_period,
            bands=tuple(b.band() for b in self.bands),
            max_per_stay_minor=self.max_per_stay_minor,
            exit_grace_minutes=self.exit_grace_minutes,
            lost_ticket_minor=self.lost_ticket_minor,
        )

    def summary(self) -> TariffSchema:
        """The shorthand view: grace, the base rate per hour, the daily cap."""
        return TariffSchema(
            grace_minutes=min(self.grace_minutes, 24 * 60),
            hourly_minor=min(self.increment_minor * 60 // self.increment_minutes, 10**9),
            daily_cap_minor=self.daily_cap_minor,
            currency=self.currency,
        )


TariffInput = TariffSpec | TariffSchema


def full_spec(tariff: TariffInput) -> TariffSpec:
    return tariff if isinstance(tariff, TariffSpec) else tariff.full()


class TariffVersionCreate(BaseModel):
    """A new version; ``effective_from`` defaults to now and may not lie in the past."""

    model_config = ConfigDict(extra="forbid")

    effective_from: AwareDatetime | None = None
    tariff: TariffInput
    note: Annotated[str, StringConstraints(max_length=500)] = ""


class TariffVersionRead(BaseModel):
    lot_id: str
    version: int
    effective_from: datetime
    tariff: TariffSpec
    note: str
    created_at: datetime


class QuotePreview(BaseModel):
    """Price a stay: with a draft ``tariff``, a given ``version``, or the version in force."""

    model_config = ConfigDict(extra="forbid")

    entry_at: AwareDatetime
    exit_at: AwareDatetime
    tariff: TariffInput | None = None
    version: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "QuotePreview":
        if self.tariff is not None and self.version is not None:
            raise ValueError("give a draft tariff or a version, not both")
        return self


class LineItemRead(BaseModel):
    description: str
    quantity: int
    amount_minor: int


class QuoteRead(BaseModel):
    lot_id: str
    version: int | None
    entry_at: datetime
    exit_at: datetime
    duration_s: int
    amount: Money
    line_items: list[LineItemRead]
