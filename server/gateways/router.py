"""HTTP for a lot's gates and their gateways' status."""

from __future__ import annotations

from fastapi import APIRouter, status

from server.deps import NowDep, SessionDep
from server.gateways import service
from server.gateways.models import GateCreate, GateRead

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/lots/{lot_id}/gates", tags=["gates"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_gate(lot_id: str, data: GateCreate, db: SessionDep, now: NowDep) -> GateRead:
    gate = service.create_gate(db, lot_id, data, now=now)
    db.commit()
    return service.gate_read(db, gate)


@router.get("")
def list_gates(lot_id: str, db: SessionDep) -> list[GateRead]:
    return [service.gate_read(db, gate) for gate in service.list_gates(db, lot_id)]
