"""Form fields to money and time: amounts typed in major units, times in a lot's zone.

Both are bounded, so a typed value can never overflow ``datetime`` or build a huge integer:
amounts up to :data:`MAX_MINOR` minor units (what the services accept), dates in the years
:data:`FIRST_YEAR` to :data:`LAST_YEAR`.

>>> to_minor("12.50", "CNY", "amount"), to_major(1250, "CNY")
(1250, '12.50')
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, DecimalException
from zoneinfo import ZoneInfo

from server.errors import UnprocessableError

__all__ = [
    "FIRST_YEAR",
    "LAST_YEAR",
    "MAX_MINOR",
    "check_year",
    "exponent",
    "local_datetime",
    "to_major",
    "to_minor",
]

_EXPONENTS = {"JPY": 0, "KRW": 0}
MAX_MINOR = 10**10  # the largest amount the pricing and payment models accept
FIRST_YEAR = 1970
LAST_YEAR = 2999


def exponent(currency: str) -> int:
    """Decimal places of ``currency`` (2 unless listed)."""
    return _EXPONENTS.get(currency, 2)


def to_minor(text: str, currency: str, what: str) -> int:
    """``"12.50"`` -> 1250; more decimals than the currency has, a negative, or more than
    :data:`MAX_MINOR` is refused (exactly: no rounding, no overflow, no giant integers)."""
    places = exponent(currency)
    try:
        value = Decimal(text.strip())
    except DecimalException:
        raise UnprocessableError(f"{what}: not an amount: {text[:40]!r}") from None
    if not value.is_finite():
        raise UnprocessableError(f"{what}: not an amount: {text[:40]!r}")
    if value < 0:
        raise UnprocessableError(f"{what}: not negative")
    # Compared in major units before any arithmetic: "1e10000000" never gets multiplied.
    if value > Decimal(MAX_MINOR).scaleb(-places):
        raise UnprocessableError(f"{what}: at most {to_major(MAX_MINOR, currency)}")
    try:
        # Bounded above, so the quantized coefficient fits the context's precision.
        minor = value.quantize(Decimal(1).scaleb(-places))
    except DecimalException:
        raise UnprocessableError(f"{what}: not an amount: {text[:40]!r}") from None
    if minor != value:
        raise UnprocessableError(f"{what}: at most {places} decimals")
    return int(minor.scaleb(places))


def to_major(minor: int | None, currency: str) -> str:
    """1250 -> ``"12.50"`` (exact: never through a float); None -> ``""``."""
    if minor is None:
        return ""
    places = exponent(currency)
    sign = "-" if minor < 0 else ""
    if places == 0:
        return f"{sign}{abs(minor)}"
    major, rest = divmod(abs(minor), 10**places)
    return f"{sign}{major}.{rest:0{places}d}"


def check_year(value: date, what: str) -> None:
    """Refuse a typed date outside :data:`FIRST_YEAR`..:data:`LAST_YEAR` (before any
    arithmetic: ``9999-12-31`` plus a day, or year 1 in UTC+5, would overflow)."""
    if not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise UnprocessableError(f"{what}: a date in the years {FIRST_YEAR} to {LAST_YEAR}")


def local_datetime(text: str, zone: str, what: str) -> datetime:
    """A ``datetime-local`` field read in ``zone`` (or with its own offset), as UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UnprocessableError(f"{what}: give a date and time") from None
    check_year(parsed, what)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(zone))
    return parsed.astimezone(UTC)
