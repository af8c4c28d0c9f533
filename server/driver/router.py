"""The driver's page: sign in with account id + PIN, then the live QR code, balance, top-up
and history. ``/driver/{account_id}`` (the older kiosk page without sign-in) now redirects to
the sign-in, since the API it read requires authentication.
"""

from __future__ import annotations

import math
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic import Field as PydanticField

from server.accounts import service as accounts
from server.accounts.models import Account, TopupRead
from server.accounts.router import svg_qr
from server.audit import service as audit
from server.auth import service as auth
from server.auth.api import limit_codes
from server.auth.models import SessionKind
from server.auth.web import (
    DRIVER_COOKIE,
    LOGIN_CSRF_COOKIE,
    DriverDep,
    DriverWriter,
    check_csrf,
    clear_cookie,
    client_address,
    current_driver,
    set_cookie,
)
from server.central import Central
from server.deps import CentralDep, NowDep, SessionDep
from server.idempotency import KEY_RESPONSES, in_flight
from server.panel.deps import PanelDep
from server.panel.templating import render
from server.payments import topups
from server.payments.provider import SandboxCardProvider
from server.sessions import service as sessions

__all__ = ["router"]

router = APIRouter(tags=["driver"])

TEMPLATES = Path(__file__).parent / "templates"
DRIVER_PATH = "/driver"
DRIVER_SESSION = timedelta(days=30)
TOPUP_CHOICES = (2000, 5000, 10000)


def _dev(request: Request) -> bool:
    return bool(request.app.state.settings.environment == "development")


def _login_page(
    request: Request, *, account_id: str = "", error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(
        "driver_login.html",
        status_code=status_code,
        directory=TEMPLATES,
        csrf_token=token,
        account_id=account_id,
        error=error,
        demo=request.app.state.settings.demo_driver_pin is not None,
    )
    set_cookie(response, _dev(request), LOGIN_CSRF_COOKIE, token, path=DRIVER_PATH, max_age=3600)
    return response


@router.get("/driver/login", response_class=HTMLResponse)
def driver_login_form(request: Request, db: SessionDep, now: NowDep, account: str = "") -> Response:
    if current_driver(request, db, now) is not None:
        return RedirectResponse("/driver", status_code=303)
    return _login_page(request, account_id=account[:36])


@router.post("/driver/login", response_class=HTMLResponse)
async def driver_login(
    request: Request,
    *,
    db: SessionDep,
    central: CentralDep,
    panel: PanelDep,
    account_id: Annotated[str, Form(max_length=36)],
    pin: Annotated[str, Form(max_length=64)],
) -> Response:
    await check_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(16))
    now = central.clock.now()
    address = client_address(request)
    keys = [f"driver:{account_id.lower()}", f"ip:{address}"]
    demo = central.settings.demo_driver_pin

    def attempt() -> tuple[str, str | None]:
        token = None
        if panel.throttle.blocked(keys, now):
            outcome = "driver.login_throttled"
        elif auth.authenticate_driver(
            db,
            account_id,
            pin,
            demo_pin=demo.get_secret_value() if demo else None,
            exists=accounts.get_account(db, account_id) is not None,
        ):
            panel.throttle.succeed(keys[:1])
            token = auth.start_session(
                db, SessionKind.DRIVER, account_id, now=now, lifetime=DRIVER_SESSION
            ).token
            outcome = "driver.login"
        else:
            panel.throttle.fail(keys, now)
            outcome = "driver.login_failed"
        audit.record(
            db,
            actor=f"driver:{account_id}" if token else "anonymous",
            action=outcome,
            target_type="account",
            target_id=account_id[:100],
            now=now,
            details={"address": address},
        )
        db.commit()
        return outcome, token

    outcome, token = await run_in_threadpool(attempt)
    if token is None:
        throttled = outcome == "driver.login_throttled"
        page = _login_page(
            request,
            account_id=account_id,
            error="Too many tries. Wait 15 minutes."
            if throttled
            else "Account or PIN not recognised.",
            status_code=429 if throttled else 401,
        )
        if throttled:
            wait = panel.throttle.retry_after(keys, now).total_seconds()
            page.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return page
    response = RedirectResponse("/driver", status_code=303)
    set_cookie(
        response,
        _dev(request),
        DRIVER_COOKIE,
        token,
        path=DRIVER_PATH,
        max_age=int(DRIVER_SESSION.total_seconds()),
    )
    clear_cookie(response, _dev(request), LOGIN_CSRF_COOKIE, path=DRIVER_PATH)
    return response


@router.post("/driver/logout")
def driver_logout(request: Request, driver: DriverWriter, db: SessionDep, now: NowDep) -> Response:
    auth.end_session(db, request.cookies.get(DRIVER_COOKIE))
    audit.record(
        db,
        actor=driver.actor,
        action="driver.logout",
        target_type="account",
        target_id=driver.account_id,
        now=now,
    )
    db.commit()
    response = RedirectResponse("/driver/login", status_code=303)
    clear_cookie(response, _dev(request), DRIVER_COOKIE, path=DRIVER_PATH)
    return response


@router.get("/driver", response_class=HTMLResponse)
def driver_home(driver: DriverDep, db: SessionDep, central: CentralDep) -> HTMLResponse:
    stored = accounts.require_account(db, driver.account_id)
    account = accounts.account_read(db, stored)
    return render(
        "driver_app.html",
        directory=TEMPLATES,
        account=account,
        csrf_token=driver.csrf_token,
        lifetime_s=central.settings.code_lifetime_s,
        refresh_before_s=min(10, max(2, central.settings.code_lifetime_s // 4)),
        choices=TOPUP_CHOICES,
        cards=_cards(central, stored),
        sandbox=isinstance(central.flow_config.payments.card, SandboxCardProvider),
    )


@router.get("/driver/api/me")
def driver_me(driver: DriverDep, db: SessionDep) -> dict[str, Any]:
    account = accounts.account_read(db, accounts.require_account(db, driver.account_id))
    found = sessions.list_sessions(db, account_id=driver.account_id, limit=20)
    return {
        "account": account.model_dump(mode="json"),
        "sessions": [sessions.session_read(item).model_dump(mode="json") for item in found],
    }


@router.get(
    "/driver/api/code.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}},
)
async def driver_code(
    request: Request, driver: DriverDep, central: CentralDep, now: NowDep
) -> Response:
    limit_codes(request, driver.account_id, now)
    issued = await run_in_threadpool(central.issue_code, driver.account_id)
    svg = await run_in_threadpool(svg_qr, issued.code)
    lifetime = int((issued.expires_at - issued.issued_at).total_seconds())
    return Response(
        svg,
        media_type="image/svg+xml",
        headers={
            "Cache-Control": "no-store",
            "X-Code-Expires-At": issued.expires_at.isoformat(),
            "X-Code-Lifetime": str(lifetime),
        },
    )


class DriverTopup(BaseModel):
    """A card top-up: the amount, and the card (a provider token; omitted: the card on file)."""

    model_config = ConfigDict(extra="forbid")
    amount_minor: Annotated[int, PydanticField(gt=0, le=100_000, strict=True)]
    card_token: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,100}$")] | None = None


@router.post(
    "/driver/api/topups",
    status_code=201,
    response_model=TopupRead,
    responses={
        402: {"description": "The card was declined: nothing was charged"},
        503: {"description": "The card payment was not confirmed: retry with the same key"},
        **KEY_RESPONSES,
    },
)
def driver_topup(
    data: DriverTopup,
    driver: DriverWriter,
    db: SessionDep,
    central: CentralDep,
    idempotency_key: Annotated[str, Header(alias="Idempotency-Key", min_length=8, max_length=200)],
) -> JSONResponse:
    """Top up the wallet by card (the configured card provider), once per Idempotency-Key."""
    now = central.clock.now()
    scope = f"topup:{driver.account_id}"
    with in_flight(central.engine, db, scope=scope, key=idempotency_key, now=now):
        outcome = topups.card_topup(
            db,
            central.flow_config.payments,
            account_id=driver.account_id,
            amount_minor=data.amount_minor,
            card_token=data.card_token,
            idempotency_key=idempotency_key,
            actor=driver.actor,
            now=now,
        )
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return JSONResponse(outcome.response.model_dump(mode="json"), status_code=201, headers=headers)


def _cards(central: Central, account: Account) -> list[tuple[str, str]]:
    """The cards the page offers: the card on file ("" = use it), then the sandbox's test cards."""
    cards = []
    if account.card_token:
        cards.append(("", account.card_label or "Card on file"))
    card = central.flow_config.payments.card
    if isinstance(card, SandboxCardProvider):
        cards.extend(card.TEST_CARDS)
    return cards


# -- the older page without sign-in ---------------------------------------------------------------
@router.get("/driver/{account_id}", response_class=HTMLResponse)
def driver_page(account_id: str) -> Response:
    """The old kiosk page read the API anonymously; the API needs sign-in now: sign in."""
    return RedirectResponse(f"/driver/login?account={quote(account_id[:36], safe='')}", 303)
