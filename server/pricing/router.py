"""HTTP for tariff versions and quote previews."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, status

from server.audit import service as audit
from server.auth.api import ApiAdmin, ApiViewer
from server.deps import NowDep, SessionDep
from server.errors import UnprocessableError
from server.lots import service as lots
from server.pricing import service
from server.pricing.engine import price
from server.pricing.models import (
    LineItemRead,
    QuotePreview,
    QuoteRead,
    TariffVersionCreate,
    TariffVersionRead,
    full_spec,
)

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/lots/{lot_id}", tags=["tariffs"])

MAX_PREVIEW = timedelta(days=366)


@router.post(
    "/tariffs",
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {
            "links": {  # OpenAPI link: what a client (and schemathesis) does next
                "GetTariffVersion": {
                    "operationId": "get_version_api_v1_lots__lot_id__tariffs__version__get",
                    "parameters": {
                        "lot_id": "$request.path.lot_id",
                        "version": "$response.body#/version",
                    },
                    "description": "The version just created",
                }
            }
        }
    },
)
def create_version(
    lot_id: str, data: TariffVersionCreate, admin: ApiAdmin, db: SessionDep, now: NowDep
) -> TariffVersionRead:
    """A new tariff version from ``effective_from`` (now or later; never retroactive)."""
    lot = lots.require_lot(db, lot_id)
    version = service.add_version(
        db,
        lot_id=lot.lot_id,
        currency=lot.currency,
        tariff=data.tariff,
        effective_from=data.effective_from or now,
        now=now,
        note=data.note,
    )
    audit.record(
        db,
        actor=admin.actor,
        action="tariff.create_version",
        target_type="lot",
        target_id=lot.lot_id,
        now=now,
        reason=data.note or "",
        details={
            "version": version.version,
            "effective_from": version.effective_from.isoformat(),
            "tariff": data.tariff.model_dump(mode="json", exclude_defaults=True),
        },
    )
    db.commit()
    return service.version_read(version)


@router.get("/tariffs")
def list_versions(lot_id: str, viewer: ApiViewer, db: SessionDep) -> list[TariffVersionRead]:
    lots.require_lot(db, lot_id)
    return [service.version_read(v) for v in service.list_versions(db, lot_id)]


@router.get("/tariffs/{version}")
def get_version(
    lot_id: str,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    viewer: ApiViewer,
    db: SessionDep,
) -> TariffVersionRead:
    return service.version_read(service.require_version(db, lot_id, version))


@router.post("/quotes")
def preview_quote(lot_id: str, data: QuotePreview, viewer: ApiViewer, db: SessionDep) -> QuoteRead:
    """Price a stay without storing anything: a draft tariff, a version, or the one in force
    at ``entry_at`` (operators preview a new version before it takes effect)."""
    lot = lots.require_lot(db, lot_id)
    if data.exit_at - data.entry_at > MAX_PREVIEW:
        raise UnprocessableError("preview stays of at most 366 days")
    version: int | None
    if data.tariff is not None:
        tariff, version = full_spec(data.tariff).tariff(lot.timezone), None
    else:
        found = (
            service.require_version(db, lot_id, data.version)
            if data.version is not None
            else service.version_at(db, lot_id, data.entry_at)
        )
        tariff, version = service.tariff_of(found, lot.timezone), found.version
    result = price(tariff, data.entry_at, data.exit_at)
    return QuoteRead(
        lot_id=lot_id,
        version=version,
        entry_at=data.entry_at,
        exit_at=data.exit_at,
        duration_s=int(result.duration.total_seconds()),
        amount=result.amount,
        line_items=[
            LineItemRead(
                description=i.description, quantity=i.quantity, amount_minor=i.amount_minor
            )
            for i in result.line_items
        ],
    )
