"""Form fields to money and time: amounts typed in major units, times in a lot's zone.

>>> to_minor("12.50", "CNY", "amount"), to_major(1250, "CNY")
(1250, '12.50')
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from server.errors import UnprocessableError

__all__ = ["exponent", "local_datetime", "to_major", "to_minor"]

_EXPONENTS = {"JPY": 0, "KRW": 0}


def exponent(currency: str) -> int:
    """Decimal places of ``currency`` (2 unless listed)."""
    return _EXPONENTS.get(currency, 2)


def to_minor(text: str, currency: str, what: str) -> int:
    """``"12.50"`` -> 1250; more decimals than the currency has, or a negative, is refused."""
    places = exponent(currency)
    try:
        value = Decimal(text.strip()) * (10**places)
    except InvalidOperation:
        raise UnprocessableError(f"{what}: not an amount: {text!r}") from None
    if not value.is_finite() or value != value.to_integral_value() or value < 0:
        raise UnprocessableError(f"{what}: at most {places} decimals, not negative")
    return int(value)


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


def local_datetime(text: str, zone: str, what: str) -> datetime:
    """A ``datetime-local`` field read in ``zone`` (or with its own offset), as UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UnprocessableError(f"{what}: give a date and time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(zone))
    return parsed.astimezone(UTC)
