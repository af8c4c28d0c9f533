"""The Dead letters page (events the service could not process, and gateways' sequence gaps)
and the operator's resolve action.

Viewers see everything; resolving needs ``operator``, the session's CSRF token and a reason,
and is audited as ``dead_letter.resolve`` (see :func:`server.panel.alarms.resolve_dead_letter`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict

from server.auth.web import OperatorWriter, ViewerDep
from server.deps import CentralDep, NowDep, SessionDep
from server.errors import ConflictError, UnprocessableError
from server.panel import alarms
from server.panel.alarms import DeadLetterState
from server.panel.router import back, page

__all__ = ["router"]

router = APIRouter(prefix="/panel", tags=["panel"], include_in_schema=False)

PAGE = "/panel/dead-letters"
LIMIT = 200

_STATES: dict[DeadLetterState, str] = {"open": "Unresolved", "resolved": "Resolved", "all": "All"}


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters_page(
    request: Request,
    *,
    operator: ViewerDep,
    db: SessionDep,
    central: CentralDep,
    state: DeadLetterState = "open",
) -> HTMLResponse:
    return page(
        request,
        "dead_letters.html",
        operator,
        letters=alarms.list_dead_letters(db, state=state, limit=LIMIT),
        unresolved=alarms.unresolved_dead_letters(db),
        gaps=alarms.sequence_gaps(central),
        mqtt=central.bridge is not None,
        state=state,
        states=_STATES,
        limit=LIMIT,
    )


@router.post("/dead-letters/{dead_letter_id}/resolve")
def resolve_form(
    request: Request,
    *,
    dead_letter_id: int,
    operator: OperatorWriter,
    db: SessionDep,
    now: NowDep,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    try:
        alarms.resolve_dead_letter(db, operator, dead_letter_id, reason=reason, now=now)
    except (UnprocessableError, ConflictError) as exc:
        return back(request, PAGE, ok=False, text=f"Not resolved: {exc.detail}")
    return back(request, PAGE, ok=True, text=f"Dead letter {dead_letter_id} resolved")


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str


@router.post("/api/dead-letters/{dead_letter_id}/resolve")
def resolve_json(
    dead_letter_id: int,
    *,
    data: ResolveRequest,
    operator: OperatorWriter,
    db: SessionDep,
    now: NowDep,
) -> dict[str, Any]:
    view = alarms.resolve_dead_letter(db, operator, dead_letter_id, reason=data.reason, now=now)
    return {
        "dead_letter_id": view.dead_letter_id,
        "resolved_at": None if view.resolved_at is None else view.resolved_at.isoformat(),
        "resolved_by": view.resolved_by,
        "resolve_reason": view.resolve_reason,
    }
