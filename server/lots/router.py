"""HTTP for lots."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from server.auth.api import ApiAdmin, ApiViewer
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.lots import service
from server.lots.models import LotCreate, LotRead

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/lots", tags=["lots"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_lot(data: LotCreate, admin: ApiAdmin, db: SessionDep, now: NowDep) -> LotRead:
    lot = service.create_lot(db, data, now=now)
    db.commit()
    return service.lot_read(db, lot, now=now)


@router.get("")
def list_lots(viewer: ApiViewer, db: SessionDep, now: NowDep) -> list[LotRead]:
    return [service.lot_read(db, lot, now=now) for lot in service.list_lots(db)]


@router.get("/{lot_id}", response_model=LotRead)
async def get_lot(lot_id: str, viewer: ApiViewer, central: CentralDep) -> Response:
    """The lot and its occupancy: what dashboards poll (cached for ``api_read_cache_s``)."""

    async def load() -> bytes:
        return await run_in_threadpool(_lot_json, central, lot_id)

    body = await central.reads.get("lot", lot_id, load)
    return Response(body, media_type="application/json")


def _lot_json(central: Central, lot_id: str) -> bytes:
    with Session(central.read_engine) as db:
        lot = service.lot_read(db, service.require_lot(db, lot_id), now=central.clock.now())
    return lot.model_dump_json().encode()
