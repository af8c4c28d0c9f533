"""Permits, validations and payment in advance on top of the tariff (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.payments.models import MAX_TIME_OFF_MINUTES
from server.pricing.adjust import Discount, PermitCover, price_stay
from server.pricing.engine import Tariff

TARIFF = Tariff(grace_minutes=10, increment_minor=500, exit_grace_minutes=15)
ENTRY = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def stay(hours: float, **kwargs: object) -> tuple[int, int]:
    result = price_stay(TARIFF, ENTRY, ENTRY + timedelta(hours=hours), **kwargs)  # type: ignore[arg-type]
    assert sum(i.amount_minor for i in result.quote.line_items) == result.quote.amount.amount_minor
    return result.quote.amount.amount_minor, result.due_minor


def test_no_adjustments_is_the_tariff_price() -> None:
    assert stay(3) == (1500, 1500)


def test_time_off_shortens_the_stay_before_pricing() -> None:
    assert stay(3, discounts=(Discount("time_off", 120, "Cinema"),)) == (500, 500)
    assert stay(3, discounts=(Discount("time_off", 175, "Cinema"),)) == (0, 0)  # into grace


def test_percent_then_amount_off_never_below_zero() -> None:
    both = (Discount("amount_off", 200, "Voucher"), Discount("percent_off", 50, "Shop"))

    assert stay(3, discounts=both) == (550, 550)  # 1500 - 750 (50%), then - 200
    assert stay(1, discounts=(Discount("amount_off", 9999, "Staff"),)) == (0, 0)


def test_discounts_are_shown_with_their_reason() -> None:
    result = price_stay(
        TARIFF, ENTRY, ENTRY + timedelta(hours=2), discounts=(Discount("percent_off", 10, "Mall"),)
    )

    assert result.quote.line_items[-1].description == "10% off: Mall"
    assert result.quote.line_items[-1].amount_minor == -100


def test_a_permit_makes_the_stay_free_until_it_ends() -> None:
    permit = PermitCover("P1", valid_until=ENTRY + timedelta(hours=5))

    assert stay(4, permit=permit) == (0, 0)
    # two hours after the permit ended: priced as a stay that started then
    assert stay(7, permit=permit) == (1000, 1000)


def test_a_permit_makes_only_its_window_free() -> None:
    permit = PermitCover(
        "P1", valid_until=ENTRY + timedelta(hours=5), valid_from=ENTRY + timedelta(hours=1)
    )

    assert stay(4, permit=permit) == (500, 500)  # the hour before it started


def test_a_permit_tariff_prices_the_time_inside_its_window_and_the_lot_tariff_the_rest() -> None:
    cheap = Tariff(increment_minor=100)
    month = PermitCover("P2", valid_until=ENTRY + timedelta(days=30), tariff=cheap)
    ends = PermitCover("P3", valid_until=ENTRY + timedelta(hours=2), tariff=cheap)

    assert stay(3, permit=month) == (300, 300)
    assert stay(5, permit=ends) == (2 * 100 + 3 * 500, 1700)  # 3 h after it ended: lot rate

    window = PermitCover(
        "P4",
        valid_until=ENTRY + timedelta(hours=3),
        tariff=cheap,
        valid_from=ENTRY + timedelta(hours=1),
    )
    assert stay(4, permit=window) == (500 + 2 * 100 + 500, 1200)
    assert stay(1, permit=window) == (500, 500)  # left before it started


def test_time_off_takes_at_most_the_whole_stay() -> None:
    huge = (Discount("time_off", 10**9, "legacy"), Discount("time_off", 10**9, "legacy"))

    assert stay(3, discounts=huge) == (0, 0)


def test_leaving_within_the_exit_grace_after_paying_costs_nothing_more() -> None:
    paid_at = ENTRY + timedelta(hours=2, minutes=30)  # paid ¥15.00 for 3 started hours

    assert stay(2 + 40 / 60, prepaid_minor=1500, prepaid_at=paid_at) == (1500, 0)
    # 20 min after paying: beyond the 15 min exit grace, the stay is priced to the exit
    assert stay(2 + 50 / 60, prepaid_minor=1500, prepaid_at=paid_at) == (1500, 0)
    assert stay(3 + 5 / 60, prepaid_minor=1500, prepaid_at=paid_at) == (2000, 500)


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_discounts_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        Discount("amount_off", value, "x")
    with pytest.raises(ValueError, match="100"):
        Discount("percent_off", 101, "x")


@given(
    st.integers(0, 3 * 24 * 60),
    st.lists(
        st.tuples(st.sampled_from(["time_off", "amount_off", "percent_off"]), st.integers(1, 100)),
        max_size=3,
    ),
    st.integers(0, 5000),
)
def test_adjustments_never_make_a_stay_negative_or_dearer(
    minutes: int, discounts: list[tuple[str, int]], prepaid: int
) -> None:
    exit_at = ENTRY + timedelta(minutes=minutes)
    plain = price_stay(TARIFF, ENTRY, exit_at).quote.amount.amount_minor
    adjusted = price_stay(
        TARIFF,
        ENTRY,
        exit_at,
        discounts=tuple(Discount(k, v, "r") for k, v in discounts),  # type: ignore[arg-type]
        prepaid_minor=prepaid,
    )

    assert 0 <= adjusted.quote.amount.amount_minor <= plain
    assert adjusted.due_minor == max(adjusted.quote.amount.amount_minor - prepaid, 0)


@given(
    st.integers(0, 3 * 366 * 24 * 60),
    st.lists(st.integers(1, MAX_TIME_OFF_MINUTES) | st.integers(1, 10**9), min_size=1, max_size=5),
    st.integers(0, 60),
)
def test_pricing_never_fails_for_any_time_off_the_api_accepts_or_once_accepted(
    minutes: int, offs: list[int], prepaid_minutes_before_exit: int
) -> None:
    exit_at = ENTRY + timedelta(minutes=minutes)
    result = price_stay(
        TARIFF,
        ENTRY,
        exit_at,
        permit=PermitCover("P", valid_until=ENTRY + timedelta(days=1), tariff=TARIFF),
        discounts=tuple(Discount("time_off", m, "r") for m in offs),
        prepaid_minor=500,
        prepaid_at=exit_at - timedelta(minutes=prepaid_minutes_before_exit),
    )

    plain = price_stay(TARIFF, ENTRY, exit_at).quote.amount.amount_minor
    assert 0 <= result.quote.amount.amount_minor <= plain
