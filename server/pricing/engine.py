"""The tariff engine: pure, takes a tariff and two instants, returns a priced quote.

A lot's simple tariff: a stay within ``grace_minutes`` is free; otherwise every started hour
costs ``hourly_minor``, and each 24 h period counted from entry costs at most
``daily_cap_minor``.

>>> from datetime import UTC, datetime, timedelta
>>> t = Tariff(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
>>> start = datetime(2026, 1, 1, 8, tzinfo=UTC)
>>> quote(t, start, start + timedelta(hours=2, minutes=1)).amount.display()
'¥15.00'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from parking_protocol.types import Money

__all__ = ["LineItem", "Quote", "Tariff", "quote"]

HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Tariff:
    grace_minutes: int
    hourly_minor: int
    daily_cap_minor: int | None
    currency: str = "CNY"

    def __post_init__(self) -> None:
        if self.grace_minutes < 0 or self.hourly_minor < 0:
            raise ValueError("grace_minutes and hourly_minor must not be negative")
        if self.daily_cap_minor is not None and self.daily_cap_minor < 0:
            raise ValueError("daily_cap_minor must not be negative")


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


def _money(tariff: Tariff, amount_minor: int) -> str:
    return Money(amount_minor=amount_minor, currency=tariff.currency).display()


def _started_hours(span: timedelta) -> int:
    whole, rest = divmod(span, HOUR)
    return int(whole) + (1 if rest else 0)


def _capped(tariff: Tariff, amount: int) -> int:
    return amount if tariff.daily_cap_minor is None else min(amount, tariff.daily_cap_minor)


def quote(tariff: Tariff, entry_at: datetime, exit_at: datetime) -> Quote:
    """Price a stay from ``entry_at`` to ``exit_at`` (both timezone-aware).

    An exit before the entry (clocks of offline gateways) counts as a zero-length stay.
    """
    if entry_at.utcoffset() is None or exit_at.utcoffset() is None:
        raise ValueError("quote needs timezone-aware datetimes")
    duration = max(exit_at - entry_at, timedelta(0))
    if duration <= timedelta(minutes=tariff.grace_minutes):
        item = LineItem(f"Within {tariff.grace_minutes} min grace period", 1, 0)
        return Quote(Money(amount_minor=0, currency=tariff.currency), duration, (item,))
    full_days, rest = divmod(duration, DAY)
    items: list[LineItem] = []
    if full_days:
        per_day = _capped(tariff, 24 * tariff.hourly_minor)
        items.append(
            LineItem(
                f"{full_days} x 24 h at {_money(tariff, per_day)}", full_days, full_days * per_day
            )
        )
    if rest:
        hours = _started_hours(rest)
        uncapped = hours * tariff.hourly_minor
        amount = _capped(tariff, uncapped)
        capped = " (daily cap)" if amount < uncapped else ""
        items.append(
            LineItem(
                f"{hours} started h at {_money(tariff, tariff.hourly_minor)}{capped}", hours, amount
            )
        )
    total = sum(item.amount_minor for item in items)
    return Quote(Money(amount_minor=total, currency=tariff.currency), duration, tuple(items))
