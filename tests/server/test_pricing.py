"""The pure tariff engine: grace, started hours, the daily cap, multi-day stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parking_protocol.types import Money
from server.pricing.engine import Tariff, quote

TARIFF = Tariff(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
ENTRY = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def price(stay: timedelta, tariff: Tariff = TARIFF) -> int:
    return quote(tariff, ENTRY, ENTRY + stay).amount.amount_minor


@pytest.mark.parametrize(
    ("stay", "expected"),
    [
        (timedelta(0), 0),
        (timedelta(minutes=15), 0),  # grace is inclusive
        (timedelta(minutes=15, seconds=1), 500),  # beyond grace: charged from entry
        (timedelta(hours=1), 500),
        (timedelta(hours=1, seconds=1), 1000),  # a started hour counts
        (timedelta(hours=2), 1000),
        (timedelta(hours=11, minutes=59), 6000),  # 12 started hours = the cap
        (timedelta(hours=13), 6000),  # capped
        (timedelta(hours=24), 6000),
        (timedelta(hours=24, minutes=1), 6500),  # day 2 starts at 24 h from entry
        (timedelta(days=2, hours=3), 2 * 6000 + 1500),
        (timedelta(days=3), 3 * 6000),
    ],
)
def test_quote_prices_the_stay(stay: timedelta, expected: int) -> None:
    assert price(stay) == expected


def test_quote_has_currency_line_items_and_duration() -> None:
    result = quote(TARIFF, ENTRY, ENTRY + timedelta(days=1, hours=2, minutes=5))

    assert result.amount == Money(amount_minor=6000 + 1500, currency="CNY")
    assert result.duration == timedelta(days=1, hours=2, minutes=5)
    assert [(i.quantity, i.amount_minor) for i in result.line_items] == [(1, 6000), (3, 1500)]


def test_within_grace_has_one_free_line_item() -> None:
    result = quote(TARIFF, ENTRY, ENTRY + timedelta(minutes=3))

    assert [i.amount_minor for i in result.line_items] == [0]
    assert "grace" in result.line_items[0].description


def test_no_cap_charges_every_started_hour() -> None:
    uncapped = Tariff(grace_minutes=0, hourly_minor=300, daily_cap_minor=None, currency="EUR")

    assert price(timedelta(hours=30), uncapped) == 30 * 300


def test_exit_before_entry_counts_as_zero() -> None:
    assert price(-timedelta(minutes=5)) == 0


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        quote(TARIFF, ENTRY.replace(tzinfo=None), ENTRY)


def test_negative_tariff_values_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Tariff(grace_minutes=-1, hourly_minor=500, daily_cap_minor=None)


@given(st.integers(min_value=0, max_value=10 * 24 * 3600), st.integers(min_value=0, max_value=3600))
def test_price_is_monotonic_and_bounded_by_the_cap(seconds: int, more: int) -> None:
    shorter = price(timedelta(seconds=seconds))
    longer = price(timedelta(seconds=seconds + more))
    days_started = -(-(seconds + more) // 86_400)

    assert 0 <= shorter <= longer
    assert longer <= max(days_started, 1) * 6000
    result = quote(TARIFF, ENTRY, ENTRY + timedelta(seconds=seconds))
    assert sum(i.amount_minor for i in result.line_items) == result.amount.amount_minor
