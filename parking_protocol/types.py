"""Shared value types: identifiers, directions, reasons and money.

Money is always an integer amount of minor units (fen, cents) plus an ISO 4217
currency code; it is never a float.

>>> Money(amount_minor=1200, currency="CNY").display()
'¥12.00'
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "DENY_TEXT",
    "AccountId",
    "CodeRejection",
    "Direction",
    "GateAction",
    "GateId",
    "LotId",
    "Money",
    "Reason",
]

# Identifiers appear in MQTT topics and in QR codes: keep them to a safe alphabet
# (no '/', '+', '#', '.' or spaces).
_ID_PATTERN = r"^[A-Za-z0-9_-]{1,36}$"
LotId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
GateId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
AccountId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]


class Direction(StrEnum):
    """Which way a lane lets vehicles through."""

    ENTRY = "entry"
    EXIT = "exit"


class GateAction(StrEnum):
    """What the central service tells a gate to do."""

    OPEN = "open"
    DENY = "deny"


class CodeRejection(StrEnum):
    """Why a driver's QR code was refused by verification (gateway or server)."""

    MALFORMED = "code_malformed"
    UNKNOWN_VERSION = "code_unknown_version"
    UNKNOWN_KEY = "code_unknown_key"
    BAD_SIGNATURE = "code_bad_signature"
    EXPIRED = "code_expired"
    NOT_YET_VALID = "code_not_yet_valid"
    REPLAYED = "code_replayed"


class Reason(StrEnum):
    """Machine-readable reason attached to a gate decision (deny reasons and a few opens)."""

    CODE_MALFORMED = "code_malformed"
    CODE_UNKNOWN_VERSION = "code_unknown_version"
    CODE_UNKNOWN_KEY = "code_unknown_key"
    CODE_BAD_SIGNATURE = "code_bad_signature"
    CODE_EXPIRED = "code_expired"
    CODE_NOT_YET_VALID = "code_not_yet_valid"
    CODE_REPLAYED = "code_replayed"
    ACCOUNT_UNKNOWN = "account_unknown"
    ACCOUNT_BLOCKED = "account_blocked"
    ALREADY_INSIDE = "already_inside"
    NO_OPEN_SESSION = "no_open_session"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    LOT_FULL = "lot_full"
    GATE_UNKNOWN = "gate_unknown"
    GATE_MISMATCH = "gate_mismatch"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"
    WELCOME = "welcome"
    PAID = "paid"
    MANUAL_OPEN = "manual_open"

    @classmethod
    def from_rejection(cls, rejection: CodeRejection) -> Reason:
        return cls(rejection.value)


# Text a gate display shows the driver for a reason. The server puts the text in the
# command it sends; a gateway deciding offline uses the same table.
DENY_TEXT: dict[Reason, str] = {
    Reason.CODE_MALFORMED: "Code not recognised - show your parking code",
    Reason.CODE_UNKNOWN_VERSION: "Code not recognised - update your app",
    Reason.CODE_UNKNOWN_KEY: "Code not valid here",
    Reason.CODE_BAD_SIGNATURE: "Code not valid",
    Reason.CODE_EXPIRED: "Code expired - refresh your code",
    Reason.CODE_NOT_YET_VALID: "Code not valid yet - check your phone's clock",
    Reason.CODE_REPLAYED: "Code already used - refresh your code",
    Reason.ACCOUNT_UNKNOWN: "Account not found",
    Reason.ACCOUNT_BLOCKED: "Account blocked - contact the operator",
    Reason.ALREADY_INSIDE: "Already parked here - exit first",
    Reason.NO_OPEN_SESSION: "No parking session found - call the operator",
    Reason.INSUFFICIENT_BALANCE: "Insufficient balance - top up in the app",
    Reason.LOT_FULL: "Car park full",
    Reason.GATE_UNKNOWN: "Gate not registered - call the operator",
    Reason.GATE_MISMATCH: "Gate error - call the operator",
    Reason.SERVICE_UNAVAILABLE: "Service unavailable - call the operator",
    Reason.INTERNAL_ERROR: "System error - call the operator",
    Reason.WELCOME: "Welcome",
    Reason.PAID: "Paid - thank you",
    Reason.MANUAL_OPEN: "Opened by operator",
}

# ISO 4217 minor-unit exponents and symbols for the currencies we display.
_CURRENCIES: dict[str, tuple[int, str]] = {
    "CNY": (2, "¥"),
    "EUR": (2, "€"),
    "USD": (2, "$"),
    "GBP": (2, "£"),
    "JPY": (0, "¥"),
}


class Money(BaseModel):
    """An amount of money: integer minor units and an ISO 4217 currency code.

    >>> Money(amount_minor=250, currency="EUR").display()
    '€2.50'
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    amount_minor: int
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = "CNY"

    def display(self) -> str:
        exponent, symbol = _CURRENCIES.get(self.currency, (2, self.currency + " "))
        sign = "-" if self.amount_minor < 0 else ""
        value = abs(self.amount_minor)
        if exponent == 0:
            return f"{sign}{symbol}{value}"
        major, minor = divmod(value, 10**exponent)
        return f"{sign}{symbol}{major}.{minor:0{exponent}d}"


PositiveSeq = Annotated[int, Field(ge=0)]
