"""Jinja2 for the panel and the driver page: one environment, filters, security headers."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from parking_protocol.types import Money
from server.auth.models import Role

__all__ = ["SECURITY_HEADERS", "STATIC", "TEMPLATES", "environment", "render"]

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def money(amount_minor: int | None, currency: str = "CNY") -> str:
    if amount_minor is None:
        return "-"
    return Money(amount_minor=amount_minor, currency=currency).display()


def when(value: datetime | None, zone: str | None = None) -> str:
    if value is None:
        return "-"
    if zone:
        local = value.astimezone(ZoneInfo(zone))
        return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or zone)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d ago"


def duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def short_id(value: str, length: int = 8) -> str:
    """An id as the panel shows it in a table: its last characters. Our ids are UUIDv7
    (:func:`parking_protocol.messages.new_id`), whose first characters are the time they
    were made: ids made in the same minute begin alike, their random tails do not."""
    return value if len(value) <= length else "…" + value[-length:]


@cache
def environment(directory: Path = TEMPLATES) -> Environment:
    env = Environment(
        loader=FileSystemLoader(directory),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )
    env.filters.update(money=money, when=when, ago=ago, duration=duration, short_id=short_id)
    env.globals["Role"] = Role
    return env


def render(
    name: str, status_code: int = 200, *, directory: Path = TEMPLATES, **context: Any
) -> HTMLResponse:
    html = environment(directory).get_template(name).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
