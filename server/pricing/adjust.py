"""What a stay really costs: the tariff's price, then permits, validations and prepayment.

Pure, like the engine. The order is fixed and shown in the line items:

1. a permit valid at entry makes the time inside its window free, or priced with the
   permit's own tariff; time outside the window is priced by the lot's tariff as a stay
   of its own (before: a stay ending when the permit starts; after: one starting when it
   ends);
2. a payment in advance followed by an exit within the tariff's exit grace prices the stay
   as if it ended at the payment;
3. time off shortens the stay (at most to nothing); then percent off; then amount off
   (never below zero);
4. what was already paid in advance is subtracted: ``due`` is what the exit must collect.

>>> from datetime import UTC, datetime, timedelta
>>> t = Tariff.simple(grace_minutes=0, hourly_minor=500, daily_cap_minor=None)
>>> start = datetime(2026, 1, 1, 8, tzinfo=UTC)
>>> stay = price_stay(t, start, start + timedelta(hours=3),
...                   discounts=(Discount("time_off", 60, "Cinema"),))
>>> stay.quote.amount.amount_minor, stay.due_minor
(1000, 1000)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from server.pricing.engine import LineItem, Quote, Tariff, price

__all__ = ["Discount", "DiscountKind", "PermitCover", "StayPrice", "price_stay"]

DiscountKind = Literal["time_off", "amount_off", "percent_off"]
_ORDER: dict[str, int] = {"time_off": 0, "percent_off": 1, "amount_off": 2}


@dataclass(frozen=True, slots=True)
class Discount:
    """A merchant validation or discount code: minutes, minor units or percent off."""

    kind: DiscountKind
    value: int
    reason: str

    def __post_init__(self) -> None:
        if self.value <= 0 or (self.kind == "percent_off" and self.value > 100):
            raise ValueError("a discount is positive (and at most 100 percent)")


@dataclass(frozen=True, slots=True)
class PermitCover:
    """A permit: free from ``valid_from`` (None: always was) until ``valid_until``, or its
    own tariff in that window."""

    permit_id: str
    valid_until: datetime
    tariff: Tariff | None = None
    valid_from: datetime | None = None


@dataclass(frozen=True, slots=True)
class StayPrice:
    quote: Quote  # what the stay costs, line items included
    due_minor: int  # what is left to collect after any payment in advance


def _with(quote: Quote, amount_minor: int, *items: LineItem) -> Quote:
    money = quote.amount.model_copy(update={"amount_minor": amount_minor})
    return Quote(money, quote.duration, quote.line_items + items)


def _permit_quote(
    tariff: Tariff, permit: PermitCover, entry_at: datetime, exit_at: datetime
) -> Quote:
    """The stay with a permit: its window free or at its tariff, the rest at ``tariff``."""
    start = entry_at if permit.valid_from is None else max(entry_at, permit.valid_from)
    end = min(exit_at, permit.valid_until)
    until = f"until {permit.valid_until:%Y-%m-%d %H:%M} UTC"
    if permit.tariff is None:
        items: tuple[LineItem, ...] = (LineItem(f"Permit {permit.permit_id} {until}", 1, 0),)
    else:
        items = (LineItem(f"Permit {permit.permit_id} tariff {until}", 1, 0),)
        if start < end:
            items += price(permit.tariff, start, end).line_items
    if entry_at < start:
        items = price(tariff, entry_at, min(start, exit_at)).line_items + items
    if exit_at > permit.valid_until:
        items += price(tariff, max(permit.valid_until, entry_at), exit_at).line_items
    total = sum(item.amount_minor for item in items)
    return Quote(tariff.money(total), max(exit_at - entry_at, timedelta(0)), items)


def price_stay(
    tariff: Tariff,
    entry_at: datetime,
    exit_at: datetime,
    *,
    permit: PermitCover | None = None,
    discounts: tuple[Discount, ...] = (),
    prepaid_minor: int = 0,
    prepaid_at: datetime | None = None,
) -> StayPrice:
    """The price of a stay after permits, validations and payment in advance."""
    entry_at, exit_at = entry_at.astimezone(UTC), exit_at.astimezone(UTC)
    exit_for_price = exit_at
    exit_grace = timedelta(minutes=tariff.exit_grace_minutes)
    after_payment: LineItem | None = None
    if prepaid_at is not None and exit_at <= prepaid_at + exit_grace:
        exit_for_price = max(prepaid_at, entry_at)
        after_payment = LineItem(
            f"Left within {tariff.exit_grace_minutes} min of paying: priced until payment", 1, 0
        )
    minutes_off = sum(d.value for d in discounts if d.kind == "time_off")
    if minutes_off:
        # At most the whole stay: a huge value would take the datetime out of range.
        stay_minutes = -(-max(exit_for_price - entry_at, timedelta(0)) // timedelta(minutes=1))
        off = timedelta(minutes=min(minutes_off, stay_minutes))
        exit_for_price = max(entry_at, exit_for_price - off)

    if permit is not None:
        quote = _permit_quote(tariff, permit, entry_at, exit_for_price)
    else:
        quote = price(tariff, entry_at, exit_for_price)
    if exit_for_price != exit_at:
        quote = Quote(quote.amount, max(exit_at - entry_at, timedelta(0)), quote.line_items)
    if after_payment is not None:
        quote = _with(quote, quote.amount.amount_minor, after_payment)

    amount = quote.amount.amount_minor
    for discount in sorted(discounts, key=lambda d: _ORDER[d.kind]):
        if discount.kind == "time_off":
            quote = _with(
                quote, amount, LineItem(f"{discount.value} min off: {discount.reason}", 1, 0)
            )
            continue
        if discount.kind == "percent_off":
            cut = amount * discount.value // 100
            label = f"{discount.value}% off: {discount.reason}"
        else:
            cut = min(discount.value, amount)
            label = f"{tariff.money(discount.value).display()} off: {discount.reason}"
        amount -= cut
        quote = _with(quote, amount, LineItem(label, 1, -cut))

    due = max(amount - prepaid_minor, 0)
    if prepaid_minor:
        quote = _with(quote, amount, LineItem("Paid in advance", 1, 0))
    return StayPrice(quote, due)
