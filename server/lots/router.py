"""HTTP for lots."""

from __future__ import annotations

from fastapi import APIRouter, status

from server.auth.api import ApiAdmin, ApiViewer
from server.deps import NowDep, SessionDep
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


@router.get("/{lot_id}")
def get_lot(lot_id: str, viewer: ApiViewer, db: SessionDep, now: NowDep) -> LotRead:
    return service.lot_read(db, service.require_lot(db, lot_id), now=now)
