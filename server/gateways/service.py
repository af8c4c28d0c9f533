"""Data access for gates, gateway statuses and command replies."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from parking_protocol.messages import CommandReply, GatewayState, GatewayStatus
from parking_protocol.types import Direction
from server.errors import ConflictError
from server.gateways.models import (
    CommandReplyRecord,
    Gate,
    GateCreate,
    GateRead,
    GateStatusRead,
    GatewayStatusRecord,
)
from server.lots.service import require_lot

__all__ = [
    "create_gate",
    "gate_read",
    "get_gate",
    "list_gates",
    "record_reply",
    "record_status",
]


def get_gate(db: Session, lot_id: str, gate_id: str) -> Gate | None:
    return db.get(Gate, (lot_id, gate_id))


def list_gates(db: Session, lot_id: str) -> list[Gate]:
    require_lot(db, lot_id)
    return list(db.exec(select(Gate).where(Gate.lot_id == lot_id).order_by(col(Gate.gate_id))))


def create_gate(db: Session, lot_id: str, data: GateCreate, *, now: datetime) -> Gate:
    require_lot(db, lot_id)
    if db.get(Gate, (lot_id, data.gate_id)) is not None:
        raise ConflictError(f"gate {data.gate_id!r} already exists in lot {lot_id!r}")
    gate = Gate(
        lot_id=lot_id,
        gate_id=data.gate_id,
        direction=data.direction.value,
        name=data.name,
        created_at=now,
    )
    db.add(gate)
    try:
        db.flush()
    except IntegrityError:
        raise ConflictError(f"gate {data.gate_id!r} already exists in lot {lot_id!r}") from None
    return gate


def gate_read(db: Session, gate: Gate) -> GateRead:
    record = db.get(GatewayStatusRecord, (gate.lot_id, gate.gate_id))
    status = None
    if record is not None:
        status = GateStatusRead(
            online=record.state == GatewayState.ONLINE,
            state=record.state,
            firmware_version=record.firmware_version,
            boot=record.boot,
            last_seen=record.last_seen,
            queue_depth=record.queue_depth,
            last_error=record.last_error,
        )
    return GateRead(
        lot_id=gate.lot_id,
        gate_id=gate.gate_id,
        direction=Direction(gate.direction),
        name=gate.name,
        status=status,
        created_at=gate.created_at,
    )


def record_status(db: Session, status: GatewayStatus, *, now: datetime) -> bool:
    """Keep the latest status of a gate; a stale OFFLINE (older boot) is ignored.

    Returns whether the status was stored.
    """
    record = db.get(GatewayStatusRecord, (status.lot_id, status.gate_id))
    if record is None:
        record = GatewayStatusRecord(
            lot_id=status.lot_id,
            gate_id=status.gate_id,
            status_id=status.status_id,
            state=status.state.value,
            boot=status.boot,
            sent_at=status.sent_at,
            last_seen=now,
        )
    elif status.state == GatewayState.OFFLINE and status.boot < record.boot:
        return False  # the last will of a previous boot arriving late
    record.status_id = status.status_id
    record.state = status.state.value
    record.direction = status.direction.value if status.direction else None
    record.firmware_version = status.firmware_version
    record.boot = status.boot
    record.sent_at = status.sent_at
    record.last_seen = now
    record.queue_depth = status.queue_depth
    record.camera_fps = status.camera_fps
    record.last_decode_ms = status.last_decode_ms
    record.last_error = status.last_error
    db.add(record)
    db.flush()
    return True


def record_reply(db: Session, reply: CommandReply, *, now: datetime) -> bool:
    """Store a gate's reply to a command once (a redelivered reply is ignored)."""
    if db.get(CommandReplyRecord, reply.reply_id) is not None:
        return False
    db.add(
        CommandReplyRecord(
            reply_id=reply.reply_id,
            command_id=reply.command_id,
            lot_id=reply.lot_id,
            gate_id=reply.gate_id,
            outcome=reply.outcome.value,
            detail=reply.detail,
            at=reply.at,
            received_at=now,
        )
    )
    db.flush()
    return True
