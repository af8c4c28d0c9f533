"""Data access for lots."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.errors import ConflictError, NotFoundError
from server.lots.models import Lot, LotCreate, LotRead, Occupancy, TariffSchema
from server.sessions.service import count_open

__all__ = ["create_lot", "get_lot", "list_lots", "lot_read", "require_lot"]


def get_lot(db: Session, lot_id: str) -> Lot | None:
    return db.get(Lot, lot_id)


def require_lot(db: Session, lot_id: str) -> Lot:
    lot = db.get(Lot, lot_id)
    if lot is None:
        raise NotFoundError(f"lot {lot_id!r} not found")
    return lot


def list_lots(db: Session) -> list[Lot]:
    return list(db.exec(select(Lot).order_by(col(Lot.lot_id))).all())


def create_lot(db: Session, data: LotCreate, *, now: datetime) -> Lot:
    if db.get(Lot, data.lot_id) is not None:
        raise ConflictError(f"lot {data.lot_id!r} already exists")
    lot = Lot(
        lot_id=data.lot_id,
        name=data.name,
        capacity=data.capacity,
        timezone=data.timezone,
        grace_minutes=data.tariff.grace_minutes,
        hourly_minor=data.tariff.hourly_minor,
        daily_cap_minor=data.tariff.daily_cap_minor,
        currency=data.tariff.currency,
        created_at=now,
    )
    db.add(lot)
    try:
        db.flush()
    except IntegrityError:
        raise ConflictError(f"lot {data.lot_id!r} already exists") from None
    return lot


def lot_read(db: Session, lot: Lot) -> LotRead:
    open_sessions = count_open(db, lot.lot_id)
    return LotRead(
        lot_id=lot.lot_id,
        name=lot.name,
        capacity=lot.capacity,
        timezone=lot.timezone,
        tariff=TariffSchema(
            grace_minutes=lot.grace_minutes,
            hourly_minor=lot.hourly_minor,
            daily_cap_minor=lot.daily_cap_minor,
            currency=lot.currency,
        ),
        occupancy=Occupancy(
            open_sessions=open_sessions,
            capacity=lot.capacity,
            full=open_sessions >= lot.capacity,
        ),
        created_at=lot.created_at,
    )
