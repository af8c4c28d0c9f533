"""Helpers for panel tests: sign in like a browser, add users, read CSRF tokens."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from parking_protocol.clock import FakeClock
from parking_protocol.messages import ScanEvent, encode, new_id
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.auth import service as auth
from server.auth.models import Role
from server.central import Central
from server.lots.models import TariffSchema
from server.sessions.models import SessionRead

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


async def scan_at(
    app: FastAPI,
    broker: InMemoryBroker,
    *,
    lot_id: str,
    gate_id: str,
    direction: Direction,
    account_id: str,
) -> None:
    """A gateway in ``lot_id`` reports a scan of the account's fresh code; waits until handled."""
    central = central_of(app)
    gateway = broker.client(f"gw-{lot_id}-{gate_id}-{new_id()[:6]}")
    await gateway.start()
    event = ScanEvent(
        event_id=new_id(),
        lot_id=lot_id,
        gate_id=gate_id,
        seq=0,
        boot=1,
        direction=direction,
        code=central.issue_code(account_id).code,
        scanned_at=central.clock.now(),
    )
    await gateway.publish(gate_topic(lot_id, gate_id, TopicKind.EVENTS), encode(event))
    await asyncio.sleep(0.05)
    await central.wait_idle()
    await gateway.close()


async def park(
    app: FastAPI,
    broker: InMemoryBroker,
    clock: FakeClock,
    account_id: str,
    *,
    stay: timedelta,
    lot_id: str = "lot1",
) -> SessionRead:
    """Drive in at ``{lot}``'s ``in1``, stay, drive out at ``out1``; returns the closed session."""
    await scan_at(
        app, broker, lot_id=lot_id, gate_id="in1", direction=Direction.ENTRY, account_id=account_id
    )
    clock.advance(stay)
    await scan_at(
        app, broker, lot_id=lot_id, gate_id="out1", direction=Direction.EXIT, account_id=account_id
    )
    latest = central_of(app).list_sessions(account_id=account_id, lot_id=lot_id)[0]
    assert latest.state == "closed", latest
    return latest
