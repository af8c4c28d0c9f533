"""The operator panel's pages, its JSON endpoints and its live feed (``/panel/...``).

Every route needs a signed-in operator; reading needs ``viewer``, operating a gate or an
account ``operator``, managing users ``admin``. Every POST carries the session's CSRF token
(a form field or the ``X-CSRF-Token`` header) and every change is written to the audit log.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict
from sqlmodel import Session

from server.accounts import service as accounts
from server.audit import service as audit
from server.auth import service as auth
from server.auth.models import Role, SessionKind
from server.auth.web import (
    LOGIN_CSRF_COOKIE,
    PANEL_COOKIE,
    AdminDep,
    AdminWriter,
    LoginRequired,
    Operator,
    OperatorWriter,
    ViewerDep,
    ViewerWriter,
    check_csrf,
    clear_cookie,
    client_address,
    current_operator,
    set_cookie,
)
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.errors import ConflictError, NotFoundError, UnprocessableError
from server.gateways.models import Gate, GatewayStatusRecord
from server.lots import service as lots
from server.panel import actions, alarms, queries, service
from server.panel.amounts import check_year
from server.panel.deps import PanelDep
from server.panel.templating import render
from server.payments import receipts
from server.payments import service as payments
from server.sessions import service as sessions
from server.sessions.models import ParkingSession, SessionState

__all__ = ["router"]

router = APIRouter(prefix="/panel", tags=["panel"], include_in_schema=False)

FLASH_COOKIE = "qrpark_flash"
PANEL_PATH = "/panel"


def _dev(request: Request) -> bool:
    return bool(request.app.state.settings.environment == "development")


def page(
    request: Request,
    name: str,
    operator: Operator | None,
    *,
    status_code: int = 200,
    refusal: str | None = None,
    **context: Any,
) -> HTMLResponse:
    """Render a panel page; shows (and clears) the one-shot notice of the last action, or
    ``refusal`` (why the request's filters were not applied) as an error notice."""
    flash = request.cookies.get(FLASH_COOKIE)
    notice = None
    if flash:
        try:
            data = json.loads(flash)
            notice = {"ok": bool(data["ok"]), "text": str(data["text"])[:300]}
        except (ValueError, KeyError, TypeError):
            notice = None
    if refusal is not None:
        notice = {"ok": False, "text": refusal[:300]}
    response = render(
        name,
        status_code=status_code,
        operator=operator,
        notice=notice,
        path=request.url.path,
        **context,
    )
    if flash:
        clear_cookie(response, _dev(request), FLASH_COOKIE, path=PANEL_PATH)
    return response


def back(request: Request, url: str, *, ok: bool, text: str) -> RedirectResponse:
    """Post/redirect/get with a notice for the next page."""
    response = RedirectResponse(url, status_code=303)
    set_cookie(
        response,
        _dev(request),
        FLASH_COOKIE,
        json.dumps({"ok": ok, "text": text}),
        path=PANEL_PATH,
        max_age=60,
    )
    return response


# -- sign-in ------------------------------------------------------------------------------------
def _safe_next(value: str | None) -> str:
    if value and value.startswith("/panel/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/panel/dashboard"


@router.get("", response_class=HTMLResponse)
def panel_root() -> RedirectResponse:
    return RedirectResponse("/panel/dashboard", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, db: SessionDep, now: NowDep, next: str | None = None) -> Response:
    if current_operator(request, db, now) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, next=_safe_next(next))


def _login_page(
    request: Request, *, next: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(
        "login.html",
        status_code=status_code,
        operator=None,
        notice=None,
        path="/panel/login",
        csrf_token=token,
        next=next,
        error=error,
    )
    set_cookie(response, _dev(request), LOGIN_CSRF_COOKIE, token, path=PANEL_PATH, max_age=3600)
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    *,
    db: SessionDep,
    central: CentralDep,
    panel: PanelDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=200)],
    csrf_token: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=500)] = "/panel/dashboard",
) -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    await check_csrf(request, expected or secrets.token_urlsafe(16))
    now = central.clock.now()
    address = client_address(request)
    keys = [f"user:{username.lower()}", f"ip:{address}"]

    def attempt() -> tuple[str, str | None]:
        if panel.throttle.blocked(keys, now):
            outcome, token = "auth.login_throttled", None
        else:
            user = auth.authenticate(db, username, password, now=now)
            if user is None:
                panel.throttle.fail(keys, now)
                outcome, token = "auth.login_failed", None
            else:
                panel.throttle.succeed(keys[:1])
                issued = auth.start_session(
                    db,
                    SessionKind.PANEL,
                    user.user_id,
                    now=now,
                    lifetime=timedelta(hours=central.settings.session_hours),
                )
                outcome, token = "auth.login", issued.token
        audit.record(
            db,
            actor=f"user:{username}" if token else "anonymous",
            action=outcome,
            target_type="user",
            target_id=username[:100],
            now=now,
            details={"address": address},
        )
        db.commit()
        return outcome, token

    outcome, token = await run_in_threadpool(attempt)
    if outcome == "auth.login_throttled":
        return _login_page(
            request,
            next=_safe_next(next),
            error="Too many failed sign-ins. Wait 15 minutes and try again.",
            status_code=429,
        )
    if token is None:
        return _login_page(
            request, next=_safe_next(next), error="Wrong user name or password.", status_code=401
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_cookie(
        response,
        _dev(request),
        PANEL_COOKIE,
        token,
        path=PANEL_PATH,
        max_age=central.settings.session_hours * 3600,
    )
    clear_cookie(response, _dev(request), LOGIN_CSRF_COOKIE, path=PANEL_PATH)
    return response


@router.post("/logout")
def logout(request: Request, operator: ViewerWriter, db: SessionDep, now: NowDep) -> Response:
    auth.end_session(db, request.cookies.get(PANEL_COOKIE))
    audit.record(
        db,
        actor=operator.actor,
        action="auth.logout",
        target_type="user",
        target_id=operator.username,
        now=now,
    )
    db.commit()
    response = RedirectResponse("/panel/login", status_code=303)
    clear_cookie(response, _dev(request), PANEL_COOKIE, path=PANEL_PATH)
    return response


# -- dashboard and live feed ----------------------------------------------------------------------
def _alarms_json(found: alarms.Alarms) -> dict[str, Any]:
    return {
        "raised": found.raised,
        "dead_letters": found.dead_letters,
        "events_missing": found.events_missing,
        "gates_missing": len(found.gaps),
    }


def _dashboard_json(db: Session, now: datetime, central: Central) -> dict[str, Any]:
    return {
        "at": now.isoformat(),
        "alarms": _alarms_json(alarms.alarms(db, central)),
        "lots": [
            {
                "lot_id": view.lot.lot_id,
                "name": view.lot.name,
                "used": view.lot.occupancy.open_sessions,
                "capacity": view.lot.occupancy.capacity,
                "full": view.lot.occupancy.full,
                "gates": [
                    {
                        "gate_id": gate.gate_id,
                        "name": gate.name,
                        "direction": gate.direction,
                        "state": gate.state,
                        "seconds_since": gate.seconds_since,
                        "firmware_version": gate.firmware_version,
                    }
                    for gate in view.gates
                ],
            }
            for view in service.dashboard(db, now)
        ],
    }


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(
    request: Request, operator: ViewerDep, db: SessionDep, now: NowDep, panel: PanelDep
) -> HTMLResponse:
    recent = [e for e in panel.hub.recent() if not e.get("quiet")]
    return page(
        request,
        "dashboard.html",
        operator,
        lots=service.dashboard(db, now),
        recent=list(reversed(recent))[:30],
        alarms=alarms.alarms(db, panel.central),
    )


@router.get("/api/dashboard")
def dashboard_json(
    operator: ViewerDep, db: SessionDep, now: NowDep, central: CentralDep
) -> dict[str, Any]:
    return _dashboard_json(db, now, central)


@router.get("/api/events", response_class=StreamingResponse)
async def live_events(request: Request, central: CentralDep, panel: PanelDep) -> Response:
    """Server-sent events: one ``data:`` JSON line per decided gate event."""

    def who() -> Operator | None:
        with Session(central.engine, expire_on_commit=False) as db:  # not held while streaming
            return current_operator(request, db, central.clock.now())

    if await run_in_threadpool(who) is None:
        raise LoginRequired(SessionKind.PANEL, api=True)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        with panel.hub.subscription() as queue:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event is None:
                    return
                yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- sessions --------------------------------------------------------------------------------------
def parse_day(value: str | None, *, end: bool = False, what: str = "date") -> datetime | None:
    """A filter's day (``YYYY-MM-DD``: the whole day in UTC) or date and time, as UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UnprocessableError(f"{what}: not a date/time: {value[:40]!r}") from None
    check_year(parsed, what)
    if parsed.tzinfo is None:
        if len(value) == 10:  # a date: the whole day (UTC)
            parsed = datetime.combine(parsed.date(), time(), UTC)
            return parsed + timedelta(days=1) if end else parsed
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


@router.get("/sessions", response_class=HTMLResponse)
def sessions_page(
    request: Request,
    *,
    operator: ViewerDep,
    db: SessionDep,
    lot: str | None = None,
    account: str | None = None,
    state: Literal["", "open", "closed"] = "",
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> HTMLResponse:
    refusal = None
    found: list[ParkingSession] = []
    try:
        first = parse_day(since, what="entered from")
        last = parse_day(until, end=True, what="entered to")
    except UnprocessableError as exc:
        refusal = f"Not searched: {exc.detail}"
    else:
        found = service.search_sessions(
            db,
            lot_id=lot or None,
            account_id=(account or "").strip() or None,
            state=state or None,
            since=first,
            until=last,
            limit=limit,
        )
    zones = {item.lot_id: item.timezone for item in lots.list_lots(db)}
    return page(
        request,
        "sessions.html",
        operator,
        status_code=422 if refusal else 200,
        refusal=refusal,
        sessions=[sessions.session_read(item) for item in found],
        lots=lots.list_lots(db),
        zones=zones,
        filters={
            "lot": lot or "",
            "account": account or "",
            "state": state,
            "since": since or "",
            "until": until or "",
        },
        limit=limit,
    )


@router.get("/sessions/{session_id}", response_class=HTMLResponse)
def session_page(
    request: Request, session_id: str, operator: ViewerDep, db: SessionDep
) -> HTMLResponse:
    parking = sessions.require_session(db, session_id)
    transaction, postings = service.transaction_postings(db, parking.charge_transaction_id)
    lot = lots.require_lot(db, parking.lot_id)
    receipt = None
    if parking.state == SessionState.CLOSED:
        receipt = receipts.receipt(db, parking)
    refundable = queries.refundable_by_session(db, [session_id]).get(session_id, 0)
    return page(
        request,
        "session.html",
        operator,
        item=sessions.session_read(parking),
        lot=lot,
        transaction=transaction,
        postings=postings,
        receipt=receipt,
        refundable=refundable,
        refund_key=secrets.token_urlsafe(18),
        history=audit.list_entries(db, target_type="session", target_id=session_id, limit=30),
    )


# -- gates -----------------------------------------------------------------------------------------
@router.get("/gates", response_class=HTMLResponse)
def gates_page(request: Request, operator: ViewerDep, db: SessionDep, now: NowDep) -> HTMLResponse:
    return page(request, "gates.html", operator, lots=service.dashboard(db, now))


@router.get("/gates/{lot_id}/{gate_id}", response_class=HTMLResponse)
def gate_page(
    request: Request,
    *,
    lot_id: str,
    gate_id: str,
    operator: ViewerDep,
    db: SessionDep,
    now: NowDep,
) -> HTMLResponse:
    gate = db.get(Gate, (lot_id, gate_id))
    if gate is None:
        raise NotFoundError(f"gate {gate_id!r} not found in lot {lot_id!r}")
    view = service.gate_view(gate, db.get(GatewayStatusRecord, (lot_id, gate_id)), now)
    opens = audit.list_entries(db, target_type="gate", target_id=f"{lot_id}/{gate_id}", limit=20)
    command_ids = [str(e.details.get("command_id")) for e in opens if e.details.get("command_id")]
    return page(
        request,
        "gate.html",
        operator,
        gate=view,
        history=service.gate_history(db, lot_id, gate_id),
        opens=opens,
        replies=service.replies_to(db, command_ids),
        ttl_s=request.app.state.settings.command_ttl_s,
    )


class OpenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str


@router.post("/gates/{lot_id}/{gate_id}/open")
async def open_gate_form(
    request: Request,
    *,
    lot_id: str,
    gate_id: str,
    operator: OperatorWriter,
    db: SessionDep,
    panel: PanelDep,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    url = f"/panel/gates/{quote(lot_id)}/{quote(gate_id)}"
    try:
        outcome = await actions.open_gate(
            panel, db, operator, lot_id=lot_id, gate_id=gate_id, reason=reason
        )
    except UnprocessableError as exc:
        return back(request, url, ok=False, text=exc.detail)
    return back(request, url, ok=outcome.ok, text=outcome.detail)


@router.post("/api/gates/{lot_id}/{gate_id}/open")
async def open_gate_json(
    lot_id: str,
    *,
    gate_id: str,
    data: OpenRequest,
    operator: OperatorWriter,
    db: SessionDep,
    panel: PanelDep,
) -> JSONResponse:
    outcome = await actions.open_gate(
        panel, db, operator, lot_id=lot_id, gate_id=gate_id, reason=data.reason
    )
    return JSONResponse(
        {"sent": outcome.ok, "detail": outcome.detail, "command_id": outcome.command_id},
        status_code=202 if outcome.ok else 503,
    )


# -- accounts --------------------------------------------------------------------------------------
@router.get("/accounts", response_class=HTMLResponse)
def accounts_page(
    request: Request, operator: ViewerDep, db: SessionDep, q: str = ""
) -> HTMLResponse:
    found = service.accounts_matching(db, q.strip()[:100])
    return page(
        request,
        "accounts.html",
        operator,
        q=q,
        accounts=[accounts.account_read(db, item) for item in found],
    )


@router.get("/accounts/{account_id}", response_class=HTMLResponse)
def account_page(
    request: Request, account_id: str, operator: ViewerDep, db: SessionDep, now: NowDep
) -> HTMLResponse:
    account = accounts.account_read(db, accounts.require_account(db, account_id))
    found = service.search_sessions(db, account_id=account_id, limit=50)
    all_lots = lots.list_lots(db)
    zone = service.panel_zone(all_lots)
    local = now.astimezone(ZoneInfo(zone)).replace(second=0, microsecond=0, tzinfo=None)
    return page(
        request,
        "account.html",
        operator,
        account=account,
        sessions=[sessions.session_read(item) for item in found],
        history=audit.list_entries(db, target_type="account", target_id=account_id, limit=30),
        permits=[payments.permit_read(p) for p in payments.list_permits(db, account_id)],
        debts=queries.outstanding_debts(db, account_id=account_id),
        lots=all_lots,
        lot_names={item.lot_id: item.name for item in all_lots},
        zone=zone,
        now=now,
        permit_from=local.isoformat(),
        permit_until=(local + timedelta(days=30)).isoformat(),
    )


@router.post("/accounts/{account_id}/block")
async def block_form(
    request: Request,
    *,
    account_id: str,
    operator: OperatorWriter,
    db: SessionDep,
    panel: PanelDep,
    blocked: Annotated[bool, Form()],
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    url = f"/panel/accounts/{quote(account_id)}"
    try:
        outcome = await actions.block_account(
            panel, db, operator, account_id, blocked=blocked, reason=reason
        )
    except UnprocessableError as exc:
        return back(request, url, ok=False, text=exc.detail)
    return back(request, url, ok=outcome.ok, text=outcome.detail)


class BlockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocked: bool
    reason: str


@router.post("/api/accounts/{account_id}/block")
async def block_json(
    account_id: str, data: BlockRequest, operator: OperatorWriter, db: SessionDep, panel: PanelDep
) -> dict[str, Any]:
    outcome = await actions.block_account(
        panel, db, operator, account_id, blocked=data.blocked, reason=data.reason
    )
    return {"blocked": data.blocked, "detail": outcome.detail}


@router.post("/accounts/{account_id}/pin")
def set_pin_form(
    request: Request,
    *,
    account_id: str,
    operator: OperatorWriter,
    db: SessionDep,
    now: NowDep,
    pin: Annotated[str, Form(max_length=64)],
) -> Response:
    url = f"/panel/accounts/{quote(account_id)}"
    accounts.require_account(db, account_id)
    try:
        auth.set_driver_pin(db, account_id, pin, now=now)
    except UnprocessableError as exc:
        return back(request, url, ok=False, text=exc.detail)
    audit.record(
        db,
        actor=operator.actor,
        action="account.set_pin",
        target_type="account",
        target_id=account_id,
        now=now,
    )
    db.commit()
    return back(request, url, ok=True, text=f"New driver PIN set for {account_id}")


# -- audit and users -------------------------------------------------------------------------------
@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    *,
    operator: ViewerDep,
    db: SessionDep,
    action: str = "",
    actor: str = "",
    target: str = "",
) -> HTMLResponse:
    entries = audit.list_entries(
        db,
        action=action or None,
        actor=actor or None,
        target_id=target or None,
        limit=200,
    )
    return page(
        request,
        "audit.html",
        operator,
        entries=entries,
        filters={"action": action, "actor": actor, "target": target},
    )


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, operator: AdminDep, db: SessionDep) -> HTMLResponse:
    return page(request, "users.html", operator, users=auth.list_users(db), roles=list(Role))


@router.post("/users")
def create_user(
    request: Request,
    *,
    operator: AdminWriter,
    db: SessionDep,
    now: NowDep,
    username: Annotated[str, Form(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")],
    password: Annotated[str, Form(max_length=200)],
    role: Annotated[Role, Form()],
) -> Response:
    try:
        auth.create_user(db, username=username, password=password, role=role, now=now)
    except (UnprocessableError, ConflictError) as exc:
        return back(request, "/panel/users", ok=False, text=str(exc))
    audit.record(
        db,
        actor=operator.actor,
        action="user.create",
        target_type="user",
        target_id=username,
        now=now,
        details={"role": role.value},
    )
    db.commit()
    return back(request, "/panel/users", ok=True, text=f"User {username} created ({role.value})")


@router.post("/users/{user_id}")
def update_user(
    request: Request,
    *,
    user_id: str,
    operator: AdminWriter,
    db: SessionDep,
    now: NowDep,
    role: Annotated[Role, Form()],
    active: Annotated[bool, Form()] = False,
    password: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    user = auth.require_user(db, user_id)
    if user.user_id == operator.user_id and (role != Role.ADMIN or not active):
        return back(request, "/panel/users", ok=False, text="You cannot demote or disable yourself")
    try:
        auth.update_user(db, user, role=role, active=active, password=password or None)
    except UnprocessableError as exc:
        return back(request, "/panel/users", ok=False, text=exc.detail)
    audit.record(
        db,
        actor=operator.actor,
        action="user.update",
        target_type="user",
        target_id=user.username,
        now=now,
        details={"role": role.value, "active": active, "password_reset": bool(password)},
    )
    db.commit()
    return back(request, "/panel/users", ok=True, text=f"User {user.username} updated")
