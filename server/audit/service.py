"""Writing and reading the audit log (in the caller's transaction)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from server.audit.models import AuditEntry, AuditRead

__all__ = ["list_entries", "record"]


def record(
    db: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    now: datetime,
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in the same transaction as the action it records."""
    entry = AuditEntry(
        at=now,
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        reason=reason,
        details=details or {},
    )
    db.add(entry)
    db.flush()
    return entry


def list_entries(
    db: Session,
    *,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    actor: str | None = None,
    limit: int = 100,
) -> list[AuditRead]:
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if target_type is not None:
        query = query.where(AuditEntry.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditEntry.target_id == target_id)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    return [AuditRead.model_validate(row, from_attributes=True) for row in db.exec(query)]
