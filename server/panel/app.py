"""Wiring the panel and the driver page into the FastAPI app (called by ``server.main``)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlmodel import Session

from server.auth.models import SessionKind
from server.auth.web import AccessDenied, CsrfRefused, LoginRequired, current_operator
from server.central import Central
from server.panel.dead_letters import router as dead_letters_router
from server.panel.money import router as money_router
from server.panel.permits import router as permits_router
from server.panel.router import router
from server.panel.runtime import PanelRuntime
from server.panel.tariffs import router as tariffs_router
from server.panel.templating import STATIC, render

__all__ = ["install_panel", "start_panel"]


def install_panel(app: FastAPI) -> None:
    """Routes, local static assets (no CDN) and the sign-in/permission error answers."""
    app.include_router(router)
    app.include_router(tariffs_router)
    app.include_router(money_router)
    app.include_router(permits_router)
    app.include_router(dead_letters_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        if exc.api:
            return JSONResponse(
                {"detail": "sign-in required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Cookie realm="qrpark"'},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = "/panel/login" if exc.kind == SessionKind.PANEL else "/driver/login"
        return RedirectResponse(f"{login}?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(AccessDenied)
    async def _access_denied(request: Request, exc: AccessDenied) -> Response:
        detail = f"This needs the {exc.needed.value} role."
        if exc.api:
            return JSONResponse({"detail": detail}, status_code=403)
        return _error_page(request, 403, "Not allowed", detail)

    @app.exception_handler(CsrfRefused)
    async def _csrf_refused(request: Request, exc: CsrfRefused) -> Response:
        if exc.api:
            return JSONResponse({"detail": exc.detail}, status_code=403)
        return _error_page(request, 403, "Request refused", exc.detail)


def _error_page(request: Request, status_code: int, title: str, detail: str) -> Response:
    central: Central = request.app.state.central
    with Session(central.engine, expire_on_commit=False) as db:
        operator = current_operator(request, db, central.clock.now())
    return render(
        "error.html",
        status_code=status_code,
        operator=operator,
        notice=None,
        path=request.url.path,
        title=title,
        detail=detail,
    )


async def start_panel(app: FastAPI, central: Central) -> PanelRuntime:
    """Start what the panel runs beside the service; ``await panel.stop()`` before the central."""
    panel = PanelRuntime(central)
    await panel.start()
    app.state.panel = panel
    return panel
