"""Data access for tariff versions: create, list, the version in force at an instant."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import sqlalchemy as sa
from sqlmodel import Session, col, select

from server.errors import NotFoundError, UnprocessableError
from server.pricing.engine import Tariff
from server.pricing.models import (
    TariffInput,
    TariffSpec,
    TariffVersion,
    TariffVersionRead,
    full_spec,
)

__all__ = [
    "add_version",
    "list_versions",
    "require_version",
    "tariff_of",
    "version_at",
    "version_read",
]


@lru_cache(maxsize=1024)
def _parse(spec_json: str, timezone: str) -> Tariff:
    return TariffSpec.model_validate_json(spec_json).tariff(timezone)


def tariff_of(version: TariffVersion, timezone: str) -> Tariff:
    """The engine tariff of a version (versions never change, so parsing is cached)."""
    return _parse(version.spec_json, timezone)


def add_version(
    db: Session,
    *,
    lot_id: str,
    currency: str,
    tariff: TariffInput,
    effective_from: datetime,
    now: datetime,
    note: str = "",
    allow_past: bool = False,
) -> TariffVersion:
    """Append the lot's next tariff version (a racing append fails on the primary key)."""
    spec = full_spec(tariff)
    if spec.currency != currency:
        raise UnprocessableError(f"the lot charges in {currency}, the tariff is in {spec.currency}")
    if not allow_past and effective_from < now:
        raise UnprocessableError("effective_from lies in the past: a tariff is never retroactive")
    latest = db.exec(
        select(sa.func.max(TariffVersion.version)).where(TariffVersion.lot_id == lot_id)
    ).one()
    version = TariffVersion(
        lot_id=lot_id,
        version=int(latest or 0) + 1,
        effective_from=effective_from,
        spec_json=spec.model_dump_json(),
        note=note,
        created_at=now,
    )
    db.add(version)
    db.flush()
    return version


def list_versions(db: Session, lot_id: str) -> list[TariffVersion]:
    return list(
        db.exec(
            select(TariffVersion)
            .where(TariffVersion.lot_id == lot_id)
            .order_by(col(TariffVersion.version))
        ).all()
    )


def require_version(db: Session, lot_id: str, version: int) -> TariffVersion:
    found = db.get(TariffVersion, (lot_id, version))
    if found is None:
        raise NotFoundError(f"lot {lot_id!r} has no tariff version {version}")
    return found


def version_at(db: Session, lot_id: str, at: datetime) -> TariffVersion:
    """The version in force at ``at``: the latest effective by then (else the first).

    Among versions with the same ``effective_from`` the newest wins.
    """
    found = db.exec(
        select(TariffVersion)
        .where(TariffVersion.lot_id == lot_id, TariffVersion.effective_from <= at)
        .order_by(col(TariffVersion.effective_from).desc(), col(TariffVersion.version).desc())
        .limit(1)
    ).first()
    if found is None:
        found = db.exec(
            select(TariffVersion)
            .where(TariffVersion.lot_id == lot_id)
            .order_by(col(TariffVersion.version))
            .limit(1)
        ).first()
    if found is None:
        raise NotFoundError(f"lot {lot_id!r} has no tariff")
    return found


def version_read(version: TariffVersion) -> TariffVersionRead:
    return TariffVersionRead(
        lot_id=version.lot_id,
        version=version.version,
        effective_from=version.effective_from,
        tariff=TariffSpec.model_validate_json(version.spec_json),
        note=version.note,
        created_at=version.created_at,
    )
