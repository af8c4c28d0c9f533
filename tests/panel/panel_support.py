"""Helpers for panel tests: sign in like a browser, add users, read CSRF tokens."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import httpx
from fastapi import FastAPI

from server.auth import service as auth
from server.auth.models import Role
from server.central import Central
from server.lots.models import TariffSchema

ADMIN_PASSWORD = "correct-horse-battery"
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
TARIFF = TariffSchema(grace_minutes=15, hourly_minor=500, daily_cap_minor=6000, currency="CNY")

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PAGE_CSRF = re.compile(r'data-csrf="([^"]+)"')


def form_token(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def page_token(html: str) -> str:
    found = _PAGE_CSRF.search(html)
    assert found, "no data-csrf in the page"
    return found.group(1)


def add_user(app: FastAPI, username: str, role: Role, password: str = "password-123") -> None:
    central: Central = app.state.central
    with central.db() as db:
        auth.create_user(
            db, username=username, password=password, role=role, now=central.clock.now()
        )


async def sign_in(
    client: httpx.AsyncClient, username: str = "admin", password: str = ADMIN_PASSWORD
) -> httpx.Response:
    login = await client.get("/panel/login")
    return await client.post(
        "/panel/login",
        data={"username": username, "password": password, "csrf_token": form_token(login.text)},
    )


async def signed_in(
    client: httpx.AsyncClient, username: str = "admin", password: str = ADMIN_PASSWORD
) -> str:
    """Sign in and return the session's CSRF token."""
    response = await sign_in(client, username, password)
    assert response.status_code == 303, response.text
    dashboard = await client.get("/panel/dashboard")
    assert dashboard.status_code == 200
    return page_token(dashboard.text)


def central_of(app: FastAPI) -> Central:
    central: Central = app.state.central
    return central
