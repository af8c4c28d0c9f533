"""The pure tariff engine: examples for every rule, then properties (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parking_protocol.types import Money
from server.pricing.engine import Band, CapPeriod, Tariff, lost_ticket_quote, price

SIMPLE = Tariff.simple(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")
ENTRY = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")


def amount(tariff: Tariff, entry: datetime, stay: timedelta) -> int:
    return price(tariff, entry, entry + stay).amount.amount_minor


def local(zone: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=zone)  # type: ignore[misc]


# -- the spine's simple tariff ----------------------------------------------------------------


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
def test_simple_tariff_prices_the_stay(stay: timedelta, expected: int) -> None:
    assert amount(SIMPLE, ENTRY, stay) == expected


def test_quote_has_currency_duration_and_line_items_summing_to_the_amount() -> None:
    result = price(SIMPLE, ENTRY, ENTRY + timedelta(days=1, hours=2, minutes=5))

    assert result.amount == Money(amount_minor=6000 + 1500, currency="CNY")
    assert result.duration == timedelta(days=1, hours=2, minutes=5)
    assert [(i.quantity, i.amount_minor) for i in result.line_items] == [
        (27, 27 * 500),
        (1, -(24 * 500 - 6000)),  # the first 24 h are capped at ¥60
    ]
    assert "Daily cap" in result.line_items[1].description
    assert sum(i.amount_minor for i in result.line_items) == result.amount.amount_minor


def test_within_grace_has_one_free_line_item() -> None:
    result = price(SIMPLE, ENTRY, ENTRY + timedelta(minutes=3))

    assert [i.amount_minor for i in result.line_items] == [0]
    assert "grace" in result.line_items[0].description


def test_exit_before_entry_counts_as_zero() -> None:
    assert amount(SIMPLE, ENTRY, -timedelta(minutes=5)) == 0


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        price(SIMPLE, ENTRY.replace(tzinfo=None), ENTRY)


@pytest.mark.parametrize(
    "bad",
    [
        {"grace_minutes": -1},
        {"increment_minor": -5},
        {"daily_cap_minor": -1},
        {"increment_minutes": 20},
    ],
)
def test_invalid_tariffs_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"negative|increment_minutes"):
        Tariff(**bad)  # type: ignore[arg-type]


# -- first period and increments -------------------------------------------------------------

FIRST_HOUR = Tariff(
    grace_minutes=10,
    first_period_minutes=60,
    first_period_minor=800,
    increment_minutes=30,
    increment_minor=300,
)


@pytest.mark.parametrize(
    ("stay", "expected"),
    [
        (timedelta(minutes=10), 0),
        (timedelta(minutes=11), 800),  # the first period is charged whole
        (timedelta(minutes=60), 800),
        (timedelta(minutes=61), 1100),  # then each started 30 min
        (timedelta(minutes=90), 1100),
        (timedelta(minutes=91), 1400),
        (timedelta(hours=3), 800 + 4 * 300),
    ],
)
def test_first_period_then_started_increments(stay: timedelta, expected: int) -> None:
    assert amount(FIRST_HOUR, ENTRY, stay) == expected


@pytest.mark.parametrize(("minutes", "increments"), [(1, 1), (15, 1), (16, 2), (45, 3), (46, 4)])
def test_fifteen_minute_increments(minutes: int, increments: int) -> None:
    tariff = Tariff(increment_minutes=15, increment_minor=125)

    assert amount(tariff, ENTRY, timedelta(minutes=minutes)) == increments * 125


# -- daily caps ---------------------------------------------------------------------------------


def test_calendar_day_cap_resets_at_local_midnight_rolling_cap_does_not() -> None:
    calendar = Tariff(
        timezone="Asia/Shanghai",
        increment_minor=500,
        daily_cap_minor=6000,
        cap_period=CapPeriod.CALENDAR_DAY,
    )
    rolling = Tariff(
        timezone="Asia/Shanghai",
        increment_minor=500,
        daily_cap_minor=6000,
        cap_period=CapPeriod.ROLLING_24H,
    )
    entry = local(SHANGHAI, 2026, 3, 2, 20, 0)  # 4 h before midnight, then 14 h

    assert amount(calendar, entry, timedelta(hours=18)) == 4 * 500 + 6000
    assert amount(rolling, entry, timedelta(hours=18)) == 6000
    cut = price(calendar, entry, entry + timedelta(hours=18)).line_items[-1]
    assert (cut.description, cut.amount_minor) == ("Daily cap ¥60.00 (2026-03-03)", -1000)


def test_maximum_per_stay_caps_a_long_stay() -> None:
    tariff = Tariff(increment_minor=500, daily_cap_minor=6000, max_per_stay_minor=15_000)

    result = price(tariff, ENTRY, ENTRY + timedelta(days=5))

    assert result.amount.amount_minor == 15_000
    assert result.line_items[-1].description == "Maximum per stay ¥150.00"


# -- bands ---------------------------------------------------------------------------------------

NIGHT = Band("Night", time(22), time(7), increment_minor=100, cap_minor=500)
WEEKEND = Band("Weekend", time(0), time(0), increment_minor=200, weekdays=frozenset({5, 6}))
BANDED = Tariff(timezone="Asia/Shanghai", increment_minor=500, bands=(NIGHT, WEEKEND))


def test_a_stay_across_the_night_is_split_at_the_band_edges() -> None:
    entry = local(SHANGHAI, 2026, 3, 2, 20, 0)  # Monday 20:00 -> Tuesday 09:00

    result = price(BANDED, entry, entry + timedelta(hours=13))

    assert result.amount.amount_minor == 2 * 500 + 500 + 2 * 500  # night capped at ¥5
    assert [(i.quantity, i.amount_minor) for i in result.line_items] == [
        (4, 2000),  # 20-22 and 07-09 at the day rate
        (9, 900),  # 22-07 at the night rate ...
        (1, -400),  # ... capped per night
    ]
    assert "Night (22:00-07:00)" in result.line_items[1].description


def test_weekend_band_applies_on_saturday_and_sunday_only() -> None:
    friday_evening = local(SHANGHAI, 2026, 3, 6, 19, 0)  # Fri 19:00 -> Sat 01:00

    result = price(BANDED, friday_evening, friday_evening + timedelta(hours=6))

    # 19-22 day (3 x 500), 22-07 night wins over weekend (first band listed): 3 x 100
    assert result.amount.amount_minor == 3 * 500 + 3 * 100
    saturday_noon = local(SHANGHAI, 2026, 3, 7, 12, 0)
    assert amount(BANDED, saturday_noon, timedelta(hours=3)) == 3 * 200


def test_each_started_increment_pays_the_rate_in_force_when_it_starts() -> None:
    entry = local(SHANGHAI, 2026, 3, 2, 21, 30)  # 21:30-22:30: one started hour at day rate

    assert amount(BANDED, entry, timedelta(minutes=60)) == 500
    assert amount(BANDED, entry, timedelta(minutes=61)) == 500 + 100


# -- daylight saving -----------------------------------------------------------------------------


def test_spring_forward_night_pays_the_hours_it_really_lasted() -> None:
    tariff = Tariff(timezone="Europe/Berlin", increment_minor=500)
    entry = local(BERLIN, 2026, 3, 29, 0, 30)  # 00:30 -> 04:30 on the wall is 3 h

    result = price(tariff, entry, local(BERLIN, 2026, 3, 29, 4, 30))

    assert result.duration == timedelta(hours=3)
    assert result.amount.amount_minor == 3 * 500


def test_fall_back_night_pays_the_hours_it_really_lasted() -> None:
    tariff = Tariff(timezone="Europe/Berlin", increment_minor=500)
    entry = local(BERLIN, 2026, 10, 25, 0, 30)  # 00:30 -> 04:30 on the wall is 5 h

    assert amount(tariff, entry, local(BERLIN, 2026, 10, 25, 4, 30) - entry) == 5 * 500


def test_a_25_hour_calendar_day_is_capped_once() -> None:
    tariff = Tariff(
        timezone="Europe/Berlin",
        increment_minor=500,
        daily_cap_minor=6000,
        cap_period=CapPeriod.CALENDAR_DAY,
    )
    start = local(BERLIN, 2026, 10, 25, 0, 0)
    end = local(BERLIN, 2026, 10, 26, 0, 0)

    result = price(tariff, start, end)

    assert result.duration == timedelta(hours=25)
    assert result.amount.amount_minor == 6000


def test_night_band_edge_on_a_dst_day_follows_the_wall_clock() -> None:
    tariff = Tariff(
        timezone="Europe/Berlin",
        increment_minor=500,
        bands=(Band("Night", time(22), time(6), increment_minor=100),),
    )
    entry = local(BERLIN, 2026, 3, 29, 5, 0)  # 05:00 CEST; night ends 06:00 CEST

    assert amount(tariff, entry, timedelta(hours=2)) == 100 + 500


# -- lost ticket ---------------------------------------------------------------------------------


def test_lost_ticket_is_a_flat_fee_when_the_tariff_has_one() -> None:
    quote = lost_ticket_quote(Tariff(lost_ticket_minor=8000))

    assert quote is not None
    assert quote.amount.amount_minor == 8000
    assert lost_ticket_quote(SIMPLE) is None


# -- properties ---------------------------------------------------------------------------------

ZONES = ["UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]
clock_times = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))
bands = st.builds(
    Band,
    name=st.sampled_from(["Night", "Peak", "Weekend"]),
    start=clock_times,
    end=clock_times,
    increment_minor=st.integers(0, 2000),
    weekdays=st.frozensets(st.integers(0, 6), min_size=1),
    cap_minor=st.none() | st.integers(0, 5000),
)
tariffs = st.builds(
    Tariff,
    currency=st.just("CNY"),
    timezone=st.sampled_from(ZONES),
    grace_minutes=st.integers(0, 30),
    first_period_minutes=st.sampled_from([0, 30, 60, 120]),
    first_period_minor=st.integers(0, 2000),
    increment_minutes=st.sampled_from([15, 30, 60]),
    increment_minor=st.integers(0, 2000),
    daily_cap_minor=st.none() | st.integers(0, 20_000),
    cap_period=st.sampled_from(list(CapPeriod)),
    bands=st.lists(bands, max_size=3).map(tuple),
    max_per_stay_minor=st.none() | st.integers(0, 50_000),
)
# 2026 includes both DST changes of every zone above.
entries = st.datetimes(
    min_value=datetime(2026, 1, 1),  # noqa: DTZ001 - hypothesis takes naive bounds
    max_value=datetime(2026, 12, 31),  # noqa: DTZ001
    timezones=st.just(UTC),
)
stays = st.integers(0, 4 * 24 * 3600).map(lambda s: timedelta(seconds=s))


@settings(max_examples=150, deadline=None)
@given(tariffs, entries, stays, stays)
def test_price_is_never_negative_and_non_decreasing_in_stay_length(
    tariff: Tariff, entry: datetime, stay: timedelta, more: timedelta
) -> None:
    shorter = price(tariff, entry, entry + stay)
    longer = price(tariff, entry, entry + stay + more)

    assert 0 <= shorter.amount.amount_minor <= longer.amount.amount_minor
    for quote in (shorter, longer):
        assert sum(i.amount_minor for i in quote.line_items) == quote.amount.amount_minor


@settings(max_examples=150, deadline=None)
@given(tariffs, entries, stays)
def test_price_never_exceeds_the_caps(tariff: Tariff, entry: datetime, stay: timedelta) -> None:
    total = amount(tariff, entry, stay)

    if tariff.max_per_stay_minor is not None:
        assert total <= tariff.max_per_stay_minor
    if tariff.daily_cap_minor is not None:
        if tariff.cap_period == CapPeriod.ROLLING_24H:
            days = max(1, -(-stay // timedelta(hours=24)))
        else:
            zone = ZoneInfo(tariff.timezone)
            first = entry.astimezone(zone).date()
            last = (entry + stay).astimezone(zone).date()
            days = (last - first).days + 1
        assert total <= days * tariff.daily_cap_minor


@given(tariffs, entries, st.integers(0, 30 * 60))
def test_the_grace_period_is_free(tariff: Tariff, entry: datetime, seconds: int) -> None:
    stay = timedelta(seconds=min(seconds, tariff.grace_minutes * 60))

    assert amount(tariff, entry, stay) == 0


def _reference(tariff: Tariff, entry: datetime, exit_: datetime) -> int:
    """Uncapped price, written independently: walk the increments, look up each band by
    minutes since local midnight and the weekday its occurrence started on."""
    if exit_ - entry <= timedelta(minutes=tariff.grace_minutes):
        return 0
    zone = ZoneInfo(tariff.timezone)
    total, at = 0, entry
    if tariff.first_period_minutes:
        total, at = (
            tariff.first_period_minor,
            entry + timedelta(minutes=tariff.first_period_minutes),
        )
    while at < exit_:
        wall = at.astimezone(zone)
        minute = wall.hour * 60 + wall.minute
        today, yesterday = wall.weekday(), (wall.weekday() - 1) % 7
        rate = tariff.increment_minor
        for band in tariff.bands:
            start = band.start.hour * 60 + band.start.minute
            end = band.end.hour * 60 + band.end.minute
            if start < end:
                hit = start <= minute < end and today in band.weekdays
            elif start == end:
                hit = today in band.weekdays
            else:
                hit = (minute >= start and today in band.weekdays) or (
                    minute < end and yesterday in band.weekdays
                )
            if hit:
                rate = band.increment_minor
                break
        total += rate
        at += timedelta(minutes=tariff.increment_minutes)
    return total


uncapped = tariffs.map(
    lambda t: Tariff(
        timezone=t.timezone,
        grace_minutes=t.grace_minutes,
        first_period_minutes=t.first_period_minutes,
        first_period_minor=t.first_period_minor,
        increment_minutes=t.increment_minutes,
        increment_minor=t.increment_minor,
        bands=tuple(Band(b.name, b.start, b.end, b.increment_minor, b.weekdays) for b in t.bands),
    )
)


@settings(max_examples=150, deadline=None)
@given(uncapped, entries, stays)
def test_stays_across_bands_are_split_at_the_band_edges(
    tariff: Tariff, entry: datetime, stay: timedelta
) -> None:
    assert amount(tariff, entry, stay) == _reference(tariff, entry, entry + stay)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(bands, min_size=1, max_size=3).map(tuple),
    st.integers(0, 365 * 24),
    st.integers(1, 72),
    st.integers(1, 72),
)
def test_pricing_is_additive_across_any_hour_boundary(
    band_set: tuple[Band, ...], start_hour: int, first: int, second: int
) -> None:
    """Hourly increments, edges on the hour, no caps: splitting the stay at an edge (or any
    hour) and pricing both parts costs exactly the same."""
    tariff = Tariff(
        timezone="Asia/Shanghai",
        increment_minor=500,
        bands=tuple(
            Band(
                b.name,
                b.start.replace(minute=0),
                b.end.replace(minute=0),
                b.increment_minor,
                b.weekdays,
            )
            for b in band_set
        ),
    )
    a = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=start_hour)
    b = a + timedelta(hours=first)
    c = b + timedelta(hours=second)

    assert amount(tariff, a, c - a) == amount(tariff, a, b - a) + amount(tariff, b, c - b)


@settings(max_examples=100, deadline=None)
@given(entries, stays, st.sampled_from(ZONES), st.sampled_from([15, 30, 60]))
def test_without_bands_or_calendar_caps_the_zone_and_dst_do_not_matter(
    entry: datetime, stay: timedelta, zone: str, increment: int
) -> None:
    def tariff(timezone: str) -> Tariff:
        return Tariff(
            timezone=timezone,
            grace_minutes=5,
            increment_minutes=increment,
            increment_minor=300,
            daily_cap_minor=4000,
        )

    assert amount(tariff(zone), entry, stay) == amount(tariff("UTC"), entry, stay)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ZONES[2:]), st.integers(0, 47), st.integers(1, 30 * 4))
def test_calendar_caps_count_each_local_day_once_on_dst_days(
    zone_name: str, start_quarter: int, quarters: int
) -> None:
    zone = ZoneInfo(zone_name)
    change_days = {
        "Europe/Berlin": [(2026, 3, 29), (2026, 10, 25)],
        "America/New_York": [(2026, 3, 8), (2026, 11, 1)],
        "Australia/Lord_Howe": [(2026, 4, 5), (2026, 10, 4)],
    }[zone_name]
    tariff = Tariff(
        timezone=zone_name,
        increment_minutes=15,
        increment_minor=100,
        daily_cap_minor=1000,
        cap_period=CapPeriod.CALENDAR_DAY,
    )
    for day in change_days:
        start = datetime(*day, tzinfo=zone).astimezone(UTC) + timedelta(minutes=15 * start_quarter)
        end = start + timedelta(minutes=15 * quarters)
        result = price(tariff, start, end)
        per_day: dict[object, int] = {}
        at = start
        while at < end:
            key = at.astimezone(zone).date()
            per_day[key] = min(per_day.get(key, 0) + 100, 1000)
            at += timedelta(minutes=15)
        assert result.amount.amount_minor == sum(per_day.values())


def test_stored_line_items_are_the_dataclass_fields_in_order() -> None:
    import json
    from dataclasses import asdict

    tariff = Tariff(
        first_period_minutes=60, first_period_minor=800, increment_minor=500, daily_cap_minor=6000
    )
    start = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)
    quote = price(tariff, start, start + timedelta(hours=30))
    assert len(quote.line_items) > 1
    assert quote.line_items_json() == json.dumps([asdict(item) for item in quote.line_items])
