"""HTML for drivers: ``/driver/{account_id}`` shows the dynamic code and refreshes it."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from server.accounts import service as accounts
from server.deps import CentralDep, SessionDep

__all__ = ["router"]

router = APIRouter(tags=["driver"])

TEMPLATES = Path(__file__).parent / "templates"


@cache
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )


@router.get("/driver/{account_id}", response_class=HTMLResponse)
def driver_page(account_id: str, db: SessionDep, central: CentralDep) -> HTMLResponse:
    account = accounts.account_read(db, accounts.require_account(db, account_id))
    html = (
        _environment()
        .get_template("driver.html")
        .render(
            account=account,
            lifetime_s=central.settings.code_lifetime_s,
            refresh_before_s=min(5, max(1, central.settings.code_lifetime_s // 4)),
        )
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
