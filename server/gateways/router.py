"""HTTP for a lot's gates, their gateways' status, and an operator's manual open."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Path, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from parking_protocol.messages import GatewayState
from parking_protocol.types import Direction
from server.auth.api import ApiAdmin, ApiOperator, ApiViewer
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.errors import NotFoundError
from server.gateways import service
from server.gateways.models import (
    Gate,
    GateCreate,
    GateRead,
    GateStatusRead,
    GatewayStatusRecord,
)
from server.lots.models import Lot
from server.panel import actions
from server.panel.deps import PanelDep

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/lots/{lot_id}/gates", tags=["gates"])

Id = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,36}$")]


class GateOpen(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=3, max_length=300)]


class GateOpenRead(BaseModel):
    sent: bool
    detail: str
    command_id: str | None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "links": {  # OpenAPI link: what a client (and schemathesis) does next
                "ListGates": {
                    "operationId": "list_gates_api_v1_lots__lot_id__gates_get",
                    "parameters": {"lot_id": "$request.path.lot_id"},
                    "description": "The lot's gates, the new one among them",
                }
            }
        }
    },
)
def create_gate(
    lot_id: str, data: GateCreate, admin: ApiAdmin, db: SessionDep, now: NowDep
) -> GateRead:
    gate = service.create_gate(db, lot_id, data, now=now)
    db.commit()
    return service.gate_read(db, gate)


@router.get("", response_model=list[GateRead])
async def list_gates(lot_id: str, viewer: ApiViewer, central: CentralDep) -> Response:
    """The lot's gates with their gateways' status: what dashboards poll (cached for
    ``api_read_cache_s``)."""

    async def load() -> bytes:
        return await run_in_threadpool(_gates_json, central, lot_id)

    body = await central.reads.get("gates", lot_id, load)
    return Response(body, media_type="application/json")


_GATES = TypeAdapter(list[GateRead])
_GATES_T: sa.Table = Gate.__table__  # type: ignore[attr-defined]
_STATUS_T: sa.Table = GatewayStatusRecord.__table__  # type: ignore[attr-defined]
_LOTS_T: sa.Table = Lot.__table__  # type: ignore[attr-defined]
_GATE, _STATUS, _LOT = _GATES_T.c, _STATUS_T.c, _LOTS_T.c
# The lot (no row: no such lot), its gates (none: one row of NULLs) and their latest status,
# in one statement: what ``service.list_gates`` + ``service.gate_read`` read in 2 + N.
_GATES_QUERY = (
    sa.select(
        _GATE.gate_id,
        _GATE.direction,
        _GATE.name,
        _GATE.created_at,
        _STATUS.state,
        _STATUS.firmware_version,
        _STATUS.boot,
        _STATUS.last_seen,
        _STATUS.queue_depth,
        _STATUS.last_error,
    )
    .select_from(_LOTS_T)
    .outerjoin(_GATES_T, _GATE.lot_id == _LOT.lot_id)
    .outerjoin(_STATUS_T, sa.and_(_STATUS.lot_id == _GATE.lot_id, _STATUS.gate_id == _GATE.gate_id))
    .where(_LOT.lot_id == sa.bindparam("lot_id"))
    .order_by(_GATE.gate_id)
)


def _gates_json(central: Central, lot_id: str) -> bytes:
    """``service.gate_read`` of each of the lot's gates, as JSON, from one Core query."""
    with central.read_engine.connect() as conn:
        rows = conn.execute(_GATES_QUERY, {"lot_id": lot_id}).all()
    if not rows:
        raise NotFoundError(f"lot {lot_id!r} not found")
    gates = [
        GateRead(
            lot_id=lot_id,
            gate_id=row.gate_id,
            direction=Direction(row.direction),
            name=row.name,
            status=None
            if row.state is None
            else GateStatusRead(
                online=row.state == GatewayState.ONLINE,
                state=row.state,
                firmware_version=row.firmware_version,
                boot=row.boot,
                last_seen=row.last_seen,
                queue_depth=row.queue_depth,
                last_error=row.last_error,
            ),
            created_at=row.created_at,
        )
        for row in rows
        if row.gate_id is not None
    ]
    return _GATES.dump_json(gates)


@router.post(
    "/{gate_id}/open",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GateOpenRead,
    responses={503: {"model": GateOpenRead, "description": "The broker is unreachable"}},
)
async def open_gate(
    lot_id: Id,
    gate_id: Id,
    data: GateOpen,
    *,
    operator: ApiOperator,
    db: SessionDep,
    panel: PanelDep,
) -> JSONResponse:
    """Open the barrier once now (a short-lived command with a deadline); audited."""
    outcome = await actions.open_gate(
        panel, db, operator, lot_id=lot_id, gate_id=gate_id, reason=data.reason
    )
    body = GateOpenRead(sent=outcome.ok, detail=outcome.detail, command_id=outcome.command_id)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED if outcome.ok else status.HTTP_503_SERVICE_UNAVAILABLE,
    )
