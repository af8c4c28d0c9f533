"""HTTP for lots."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from server.auth.api import ApiAdmin, ApiViewer
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.lots import service
from server.lots.models import Lot, LotCreate, LotRead, Occupancy
from server.pricing.models import TariffSpec, TariffVersion
from server.sessions.models import ParkingSession, SessionState, state_in

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


_LOTS: sa.Table = Lot.__table__  # type: ignore[attr-defined]
_VERSIONS: sa.Table = TariffVersion.__table__  # type: ignore[attr-defined]
_SESSIONS: sa.Table = ParkingSession.__table__  # type: ignore[attr-defined]
_LOT, _TV, _PS = _LOTS.c, _VERSIONS.c, _SESSIONS.c
# ``service.lot_read`` in one statement: the lot, its open sessions (``count_open``) and the
# tariff version in force at :now (``pricing.version_at``: the latest effective by then, the
# newest among equals; with none effective yet, ``_lot_json`` asks the service instead).
_OPEN = (
    sa.select(sa.func.count())
    .select_from(_SESSIONS)
    .where(_PS.lot_id == _LOT.lot_id, state_in(SessionState.OPEN))
    .correlate(_LOTS)
    .scalar_subquery()
)
_IN_FORCE = (
    sa.select(_TV.version)
    .where(_TV.lot_id == _LOT.lot_id, _TV.effective_from <= sa.bindparam("now"))
    .order_by(_TV.effective_from.desc(), _TV.version.desc())
    .limit(1)
    .correlate(_LOTS)
    .scalar_subquery()
)
_CURRENT = _VERSIONS.alias("current_version")
_LOT_QUERY = (
    sa.select(
        _LOT.name,
        _LOT.capacity,
        _LOT.timezone,
        _LOT.payment_policy,
        _LOT.created_at,
        _OPEN.label("open_sessions"),
        _CURRENT.c.version,
        _CURRENT.c.spec_json,
    )
    .select_from(
        _LOTS.outerjoin(
            _CURRENT,
            sa.and_(
                _CURRENT.c.lot_id == _LOT.lot_id,
                _CURRENT.c.version == _IN_FORCE,
            ),
        )
    )
    .where(_LOT.lot_id == sa.bindparam("lot_id"))
)


def _lot_json(central: Central, lot_id: str) -> bytes:
    """``service.lot_read`` of the lot at now, as JSON, from one Core query."""
    now = central.clock.now()
    with central.read_engine.connect() as conn:
        row = conn.execute(_LOT_QUERY, {"lot_id": lot_id, "now": now}).one_or_none()
    if row is None or row.version is None:  # no such lot, no version in force: the service
        with Session(central.read_engine) as db:
            lot = service.lot_read(db, service.require_lot(db, lot_id), now=now)
        return lot.model_dump_json().encode()
    open_sessions = int(row.open_sessions)
    read = LotRead(
        lot_id=lot_id,
        name=row.name,
        capacity=row.capacity,
        timezone=row.timezone,
        tariff=TariffSpec.model_validate_json(row.spec_json).summary(),
        tariff_version=row.version,
        payment_policy="pay_later" if row.payment_policy == "pay_later" else "pay_on_exit",
        occupancy=Occupancy(
            open_sessions=open_sessions,
            capacity=row.capacity,
            full=open_sessions >= row.capacity,
        ),
        created_at=row.created_at,
    )
    return read.model_dump_json().encode()
