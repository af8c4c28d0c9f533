"""Data access for lots (a new lot gets its first tariff version in the same transaction)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.errors import ConflictError, NotFoundError
from server.lots.models import Lot, LotCreate, LotRead, Occupancy
from server.pricing import service as pricing
from server.pricing.models import TariffSpec, TariffVersion, full_spec
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
    spec = full_spec(data.tariff)
    summary = spec.summary()
    lot = Lot(
        lot_id=data.lot_id,
        name=data.name,
        capacity=data.capacity,
        timezone=data.timezone,
        grace_minutes=summary.grace_minutes,
        hourly_minor=summary.hourly_minor,
        daily_cap_minor=summary.daily_cap_minor,
        currency=spec.currency,
        payment_policy=data.payment_policy,
        created_at=now,
    )
    db.add(lot)
    try:
        db.flush()
    except IntegrityError:
        raise ConflictError(f"lot {data.lot_id!r} already exists") from None
    pricing.add_version(
        db,
        lot_id=lot.lot_id,
        currency=lot.currency,
        tariff=spec,
        effective_from=now,
        now=now,
        note="initial tariff",
    )
    return lot


def _current(db: Session, lot: Lot, now: datetime | None) -> TariffVersion:
    if now is not None:
        return pricing.version_at(db, lot.lot_id, now)
    return pricing.list_versions(db, lot.lot_id)[-1]


def lot_read(db: Session, lot: Lot, *, now: datetime | None = None) -> LotRead:
    """The lot with the tariff in force at ``now`` (without ``now``: the newest version)."""
    open_sessions = count_open(db, lot.lot_id)
    version = _current(db, lot, now)
    return LotRead(
        lot_id=lot.lot_id,
        name=lot.name,
        capacity=lot.capacity,
        timezone=lot.timezone,
        tariff=TariffSpec.model_validate_json(version.spec_json).summary(),
        tariff_version=version.version,
        payment_policy="pay_later" if lot.payment_policy == "pay_later" else "pay_on_exit",
        occupancy=Occupancy(
            open_sessions=open_sessions,
            capacity=lot.capacity,
            full=open_sessions >= lot.capacity,
        ),
        created_at=lot.created_at,
    )
