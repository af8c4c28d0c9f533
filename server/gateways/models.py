"""Tables for gates, gateway status and command replies; the gate API schemas."""

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, StringConstraints
from sqlmodel import Field, SQLModel

from parking_protocol.types import Direction, GateId
from server.db import UTCDateTime

__all__ = [
    "CommandReplyRecord",
    "Gate",
    "GateCreate",
    "GateRead",
    "GateStatusRead",
    "GatewayStatusRecord",
]


class Gate(SQLModel, table=True):
    __tablename__ = "gates"

    lot_id: str = Field(primary_key=True, max_length=36, foreign_key="lots.lot_id")
    gate_id: str = Field(primary_key=True, max_length=36)
    direction: str = Field(max_length=8)
    name: str = Field(default="", max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)


class GatewayStatusRecord(SQLModel, table=True):
    """The latest status a gate's gateway reported (one row per gate)."""

    __tablename__ = "gateway_status"

    lot_id: str = Field(primary_key=True, max_length=36)
    gate_id: str = Field(primary_key=True, max_length=36)
    status_id: str = Field(max_length=64)
    state: str = Field(max_length=16)
    direction: str | None = Field(default=None, max_length=8)
    firmware_version: str = Field(default="", max_length=200)
    boot: int = Field(sa_type=sa.BigInteger)
    sent_at: datetime = Field(sa_type=UTCDateTime)
    last_seen: datetime = Field(sa_type=UTCDateTime)
    queue_depth: int = 0
    camera_fps: float | None = None
    last_decode_ms: float | None = None
    last_error: str | None = Field(default=None, max_length=200)


class CommandReplyRecord(SQLModel, table=True):
    __tablename__ = "command_replies"

    reply_id: str = Field(primary_key=True, max_length=64)
    command_id: str = Field(max_length=64, index=True)
    lot_id: str = Field(max_length=36)
    gate_id: str = Field(max_length=36)
    outcome: str = Field(max_length=16)
    detail: str = Field(default="", max_length=200)
    at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime)


class GateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate_id: GateId
    direction: Direction
    name: Annotated[str, StringConstraints(max_length=200)] = ""


class GateStatusRead(BaseModel):
    online: bool
    state: str
    firmware_version: str
    boot: int
    last_seen: datetime
    queue_depth: int
    last_error: str | None = None


class GateRead(BaseModel):
    lot_id: str
    gate_id: str
    direction: Direction
    name: str
    status: GateStatusRead | None = None
    created_at: datetime
