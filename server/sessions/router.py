"""HTTP for parking sessions (read-only)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from server.deps import SessionDep
from server.sessions import service
from server.sessions.models import SessionRead

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"])


@router.get("")
def list_sessions(
    db: SessionDep,
    lot_id: str | None = None,
    account_id: str | None = None,
    state: Literal["open", "closed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[SessionRead]:
    found = service.list_sessions(
        db, lot_id=lot_id, account_id=account_id, state=state, limit=limit
    )
    return [service.session_read(parking) for parking in found]


@router.get("/{session_id}")
def get_session(session_id: str, db: SessionDep) -> SessionRead:
    return service.session_read(service.require_session(db, session_id))
