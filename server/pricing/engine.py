"""The tariff engine: pure, takes a tariff and two instants, returns a priced quote.

Rules, in the order they apply:

* a stay of at most ``grace_minutes`` is free; beyond it the stay is charged from entry;
* an optional first period (``first_period_minutes`` for ``first_period_minor``);
* then every *started* increment (15, 30 or 60 minutes of elapsed time) is charged at the
  rate of the band in force when the increment starts (``increment_minor`` outside bands);
* time-of-day / weekday bands (night, weekend ...) are judged in the lot's IANA zone, so a
  stay is split at band edges on the wall clock; a band may cap what one occurrence costs;
* a daily cap per calendar day in the lot's zone, or per rolling 24 h from entry;
* a maximum per stay.

Time is elapsed time: a stay across a daylight-saving change pays for the hours it really
lasted, and a calendar day of 23 or 25 hours is still one day for the cap. Money is integer
minor units. The line items always sum to the amount, caps appearing as negative lines.

>>> from datetime import UTC, datetime, timedelta
>>> t = Tariff.simple(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
>>> start = datetime(2026, 1, 1, 8, tzinfo=UTC)
>>> price(t, start, start + timedelta(hours=2, minutes=1)).amount.display()
'¥15.00'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from parking_protocol.types import Money

__all__ = [
    "INCREMENTS",
    "Band",
    "CapPeriod",
    "LineItem",
    "Quote",
    "Tariff",
    "free_quote",
    "lost_ticket_quote",
    "price",
]

DAY = timedelta(hours=24)
DayKey = date | int  # a calendar date in the lot's zone, or the index of a rolling 24 h
INCREMENTS = (15, 30, 60)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class CapPeriod(StrEnum):
    """What "a day" means for the daily cap."""

    CALENDAR_DAY = "calendar_day"  # midnight to midnight in the lot's zone
    ROLLING_24H = "rolling_24h"  # each 24 h counted from entry


@dataclass(frozen=True, slots=True)
class Band:
    """A rate in force on some weekdays between two wall-clock times of the lot's zone.

    ``end <= start`` crosses midnight (22:00-07:00); ``end == start`` is the whole day.
    ``weekdays`` (0 = Monday) name the day an occurrence *starts*. ``cap_minor`` limits
    what one occurrence costs (a night flat rate). Earlier bands win where they overlap.
    """

    name: str
    start: time
    end: time
    increment_minor: int
    weekdays: frozenset[int] = frozenset(range(7))
    cap_minor: int | None = None

    def __post_init__(self) -> None:
        if self.increment_minor < 0 or (self.cap_minor is not None and self.cap_minor < 0):
            raise ValueError(f"band {self.name!r}: amounts must not be negative")
        if not self.weekdays or not self.weekdays <= frozenset(range(7)):
            raise ValueError(f"band {self.name!r}: weekdays are 0 (Monday) to 6 (Sunday)")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError(f"band {self.name!r}: times are wall-clock times without a zone")

    def occurrence(self, local: datetime) -> date | None:
        """The local date this band's occurrence covering ``local`` started, or None."""
        day, clock = local.date(), local.time().replace(fold=0)
        if self.start < self.end:
            inside = self.start <= clock < self.end and day.weekday() in self.weekdays
            return day if inside else None
        if self.start == self.end:
            return day if day.weekday() in self.weekdays else None
        if clock >= self.start and day.weekday() in self.weekdays:
            return day
        before = day - timedelta(days=1)
        if clock < self.end and before.weekday() in self.weekdays:
            return before
        return None

    def describe(self) -> str:
        days = ""
        if self.weekdays != frozenset(range(7)):
            days = " " + ",".join(_WEEKDAYS[d] for d in sorted(self.weekdays))
        return f"{self.name} ({self.start:%H:%M}-{self.end:%H:%M}{days})"


@dataclass(frozen=True, slots=True)
class Tariff:
    """One version of a lot's tariff, with the lot's time zone (all amounts in minor units)."""

    currency: str = "CNY"
    timezone: str = "UTC"
    grace_minutes: int = 0
    first_period_minutes: int = 0
    first_period_minor: int = 0
    increment_minutes: int = 60
    increment_minor: int = 0
    daily_cap_minor: int | None = None
    cap_period: CapPeriod = CapPeriod.ROLLING_24H
    bands: tuple[Band, ...] = ()
    max_per_stay_minor: int | None = None
    exit_grace_minutes: int = 0
    lost_ticket_minor: int | None = None
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        amounts = (
            self.grace_minutes,
            self.first_period_minutes,
            self.first_period_minor,
            self.increment_minor,
            self.exit_grace_minutes,
            self.daily_cap_minor or 0,
            self.max_per_stay_minor or 0,
            self.lost_ticket_minor or 0,
        )
        if min(amounts) < 0:
            raise ValueError("tariff amounts and durations must not be negative")
        if self.increment_minutes not in INCREMENTS:
            raise ValueError(f"increment_minutes must be one of {INCREMENTS}")
        object.__setattr__(self, "zone", _zone(self.timezone))

    @classmethod
    def simple(
        cls,
        *,
        grace_minutes: int,
        hourly_minor: int,
        daily_cap_minor: int | None,
        currency: str = "CNY",
        timezone: str = "UTC",
    ) -> Tariff:
        """The spine's tariff: grace, every started hour, a cap per rolling 24 h."""
        return cls(
            currency=currency,
            timezone=timezone,
            grace_minutes=grace_minutes,
            increment_minutes=60,
            increment_minor=hourly_minor,
            daily_cap_minor=daily_cap_minor,
            cap_period=CapPeriod.ROLLING_24H,
        )

    def money(self, amount_minor: int) -> Money:
        return Money(amount_minor=amount_minor, currency=self.currency)


@dataclass(frozen=True, slots=True)
class LineItem:
    description: str
    quantity: int
    amount_minor: int


@dataclass(frozen=True, slots=True)
class Quote:
    amount: Money
    duration: timedelta
    line_items: tuple[LineItem, ...]

    def line_items_json(self) -> str:
        """The line items as stored with a stay: ``[{"description", "quantity",
        "amount_minor"}, ...]`` (``dataclasses.asdict`` made the same, at several times the
        cost on a busy service's hot path)."""
        return json.dumps(
            [
                {
                    "description": item.description,
                    "quantity": item.quantity,
                    "amount_minor": item.amount_minor,
                }
                for item in self.line_items
            ]
        )


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _show(tariff: Tariff, amount_minor: int) -> str:
    return tariff.money(amount_minor).display()


def _increment_label(minutes: int) -> str:
    return "1 h" if minutes == 60 else f"{minutes} min"


def free_quote(tariff: Tariff, duration: timedelta, description: str) -> Quote:
    return Quote(tariff.money(0), duration, (LineItem(description, 1, 0),))


def lost_ticket_quote(tariff: Tariff) -> Quote | None:
    """The flat fee for an exit with no known entry, or None when the tariff has none."""
    if tariff.lost_ticket_minor is None:
        return None
    item = LineItem("Lost ticket / unknown entry (flat fee)", 1, tariff.lost_ticket_minor)
    return Quote(tariff.money(tariff.lost_ticket_minor), timedelta(0), (item,))


class _Caps:
    """Applies band, daily and per-stay caps as charges accrue, remembering what each cut."""

    def __init__(self, tariff: Tariff) -> None:
        self.tariff = tariff
        self.per_day: dict[DayKey, int] = {}
        self.per_band: dict[tuple[int, date], int] = {}
        self.total = 0
        self.band_cut: dict[int, int] = {}
        self.day_cut: dict[DayKey, int] = {}
        self.stay_cut = 0

    def add(self, amount: int, day: DayKey, band: tuple[int, date] | None) -> None:
        tariff = self.tariff
        if band is not None:
            cap = tariff.bands[band[0]].cap_minor
            if cap is not None:
                used = self.per_band.get(band, 0)
                allowed = min(amount, max(cap - used, 0))
                self.per_band[band] = used + allowed
                self.band_cut[band[0]] = self.band_cut.get(band[0], 0) + amount - allowed
                amount = allowed
        if tariff.daily_cap_minor is not None:
            used = self.per_day.get(day, 0)
            allowed = min(amount, max(tariff.daily_cap_minor - used, 0))
            self.per_day[day] = used + allowed
            if amount > allowed:
                self.day_cut[day] = self.day_cut.get(day, 0) + amount - allowed
            amount = allowed
        if tariff.max_per_stay_minor is not None:
            allowed = min(amount, max(tariff.max_per_stay_minor - self.total, 0))
            self.stay_cut += amount - allowed
            amount = allowed
        self.total += amount


def price(tariff: Tariff, entry_at: datetime, exit_at: datetime) -> Quote:
    """Price a stay from ``entry_at`` to ``exit_at`` (both timezone-aware).

    An exit before the entry (clocks of offline gateways) counts as a zero-length stay.
    """
    if entry_at.utcoffset() is None or exit_at.utcoffset() is None:
        raise ValueError("price needs timezone-aware datetimes")
    # In UTC: Python subtracts two times of the same zone on the wall clock, not in real time.
    entry_at, exit_at = entry_at.astimezone(UTC), exit_at.astimezone(UTC)
    duration = max(exit_at - entry_at, timedelta(0))
    if duration <= timedelta(minutes=tariff.grace_minutes):
        return free_quote(tariff, duration, f"Within {tariff.grace_minutes} min grace period")
    zone = tariff.zone
    end = entry_at + duration
    calendar = tariff.cap_period == CapPeriod.CALENDAR_DAY

    caps = _Caps(tariff)
    items: list[LineItem] = []
    at = entry_at
    if tariff.first_period_minutes:
        first_day: DayKey = entry_at.astimezone(zone).date() if calendar else 0
        caps.add(tariff.first_period_minor, first_day, None)
        items.append(
            LineItem(f"First {tariff.first_period_minutes} min", 1, tariff.first_period_minor)
        )
        at = entry_at + timedelta(minutes=tariff.first_period_minutes)

    step = timedelta(minutes=tariff.increment_minutes)
    counts: dict[int, int] = {}  # band index (-1: base rate) -> started increments
    bands = tariff.bands
    while at < end:
        rate, index, occurrence = tariff.increment_minor, -1, None
        day: DayKey
        if bands or calendar:
            local = at.astimezone(zone)  # the one wall-clock conversion per increment
            day = local.date() if calendar else (at - entry_at) // DAY
            for i, band in enumerate(bands):
                started = band.occurrence(local)
                if started is not None:
                    rate, index, occurrence = band.increment_minor, i, (i, started)
                    break
        else:
            day = (at - entry_at) // DAY
        counts[index] = counts.get(index, 0) + 1
        caps.add(rate, day, occurrence)
        at += step

    unit = _increment_label(tariff.increment_minutes)
    for index in sorted(counts, key=lambda i: (i >= 0, i)):
        rate = tariff.increment_minor if index < 0 else bands[index].increment_minor
        name = "" if index < 0 else f" {bands[index].describe()}"
        quantity = counts[index]
        items.append(
            LineItem(
                f"{quantity} x {unit} at {_show(tariff, rate)}{name}", quantity, quantity * rate
            )
        )
        cut = caps.band_cut.get(index, 0)
        if index >= 0 and cut:
            cap = bands[index].cap_minor or 0
            items.append(LineItem(f"{bands[index].name} cap {_show(tariff, cap)}", 1, -cut))
    for day, cut in caps.day_cut.items():
        label = str(day) if isinstance(day, date) else f"day {day + 1}"
        cap = tariff.daily_cap_minor or 0
        items.append(LineItem(f"Daily cap {_show(tariff, cap)} ({label})", 1, -cut))
    if caps.stay_cut:
        cap = tariff.max_per_stay_minor or 0
        items.append(LineItem(f"Maximum per stay {_show(tariff, cap)}", 1, -caps.stay_cut))
    return Quote(tariff.money(caps.total), duration, tuple(items))
