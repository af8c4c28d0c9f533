"""HTTP for a lot's gates, their gateways' status, and an operator's manual open."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlmodel import Session

from server.auth.api import ApiAdmin, ApiOperator, ApiViewer
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.gateways import service
from server.gateways.models import GateCreate, GateRead
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


def _gates_json(central: Central, lot_id: str) -> bytes:
    with Session(central.read_engine) as db:
        gates = [service.gate_read(db, gate) for gate in service.list_gates(db, lot_id)]
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
