"""The panel's own table: each gate's status changes over time (the bridge keeps the latest)."""

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime

__all__ = ["GateStatusChange"]


class GateStatusChange(SQLModel, table=True):
    """A change of a gateway's state, boot, firmware or error (heartbeats alone are not kept)."""

    __tablename__ = "gate_status_history"
    __table_args__ = (sa.Index("ix_gate_status_history_gate_at", "lot_id", "gate_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    lot_id: str = Field(max_length=36)
    gate_id: str = Field(max_length=36)
    state: str = Field(max_length=16)
    boot: int = Field(sa_type=sa.BigInteger)
    firmware_version: str = Field(default="", max_length=200)
    last_error: str | None = Field(default=None, max_length=200)
    at: datetime = Field(sa_type=UTCDateTime)
