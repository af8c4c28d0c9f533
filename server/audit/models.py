"""The audit log table and its read schema."""

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime

__all__ = ["AuditEntry", "AuditRead"]


class AuditEntry(SQLModel, table=True):
    """One state-changing action. Rows are only ever inserted."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=100, index=True)
    action: str = Field(max_length=64, index=True)
    target_type: str = Field(max_length=32)
    target_id: str = Field(max_length=100, index=True)
    reason: str = Field(default="", max_length=500)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class AuditRead(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    reason: str
    details: dict[str, Any]
