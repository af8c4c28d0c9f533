"""Every table of the central service, imported in one place for Alembic and tests."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlmodel import SQLModel

from server.accounts.models import Account, LedgerTransaction, Posting, TopupRequest
from server.audit.models import AuditEntry
from server.auth.models import ApiToken, DriverCredential, User, WebSession
from server.gateways.models import CommandReplyRecord, Gate, GatewayStatusRecord
from server.idempotency import InFlightKey
from server.lots.models import Lot
from server.panel.models import GateStatusChange
from server.payments.models import IdempotencyRecord, Payment, Permit, Refund, Validation
from server.pricing.models import TariffVersion
from server.sessions.models import DeadLetter, ParkingSession, ProcessedEvent, UsedNonce

__all__ = [
    "Account",
    "ApiToken",
    "AuditEntry",
    "CommandReplyRecord",
    "DeadLetter",
    "DriverCredential",
    "Gate",
    "GateStatusChange",
    "GatewayStatusRecord",
    "IdempotencyRecord",
    "InFlightKey",
    "LedgerTransaction",
    "Lot",
    "ParkingSession",
    "Payment",
    "Permit",
    "Posting",
    "ProcessedEvent",
    "Refund",
    "TariffVersion",
    "TopupRequest",
    "UsedNonce",
    "User",
    "Validation",
    "WebSession",
    "metadata",
]


def metadata() -> MetaData:
    return SQLModel.metadata
