"""Every table of the central service, imported in one place for Alembic and tests."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlmodel import SQLModel

from server.accounts.models import Account, LedgerTransaction, Posting, TopupRequest
from server.audit.models import AuditEntry
from server.gateways.models import CommandReplyRecord, Gate, GatewayStatusRecord
from server.lots.models import Lot
from server.sessions.models import DeadLetter, ParkingSession, ProcessedEvent, UsedNonce

__all__ = [
    "Account",
    "AuditEntry",
    "CommandReplyRecord",
    "DeadLetter",
    "Gate",
    "GatewayStatusRecord",
    "LedgerTransaction",
    "Lot",
    "ParkingSession",
    "Posting",
    "ProcessedEvent",
    "TopupRequest",
    "UsedNonce",
    "metadata",
]


def metadata() -> MetaData:
    return SQLModel.metadata
