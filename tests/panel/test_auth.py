"""Signing in to the panel: hashed passwords, cookies, CSRF, rate limiting, audit."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from panel_support import ADMIN_PASSWORD, central_of, form_token, sign_in, signed_in
from pydantic import ValidationError
from sqlmodel import select

from parking_protocol.clock import FakeClock
from server.audit import service as audit
from server.auth.models import User
from server.config import ServerSettings
from server.main import create_app


def audit_actions(app: FastAPI) -> list[str]:
    with central_of(app).db() as db:
        return [entry.action for entry in audit.list_entries(db)]


async def test_anonymous_page_is_redirected_to_sign_in(client: httpx.AsyncClient) -> None:
    for path in ("/panel/dashboard", "/panel/sessions", "/panel/gates/lot1/in1", "/panel/users"):
        response = await client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/panel/login?next=%2Fpanel%2F")


async def test_anonymous_json_and_actions_get_401(client: httpx.AsyncClient) -> None:
    assert (await client.get("/panel/api/dashboard")).status_code == 401
    assert (await client.get("/panel/api/events")).status_code == 401
    opened = await client.post("/panel/api/gates/lot1/in1/open", json={"reason": "test"})
    assert opened.status_code == 401
    blocked = await client.post(
        "/panel/api/accounts/bob/block", json={"blocked": True, "reason": "test"}
    )
    assert blocked.status_code == 401
    assert (await client.get("/driver/api/me")).status_code == 401
    assert (await client.get("/driver/api/code.svg")).status_code == 401


async def test_first_admin_signs_in_with_a_hashed_password_and_is_audited(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    response = await sign_in(client)

    assert response.status_code == 303
    assert response.headers["location"] == "/panel/dashboard"
    cookie = next(
        value
        for value in response.headers.get_list("set-cookie")
        if value.startswith("qrpark_session=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
    assert "Path=/panel" in cookie
    assert "Secure" not in cookie  # development serves plain http
    with central_of(app).db() as db:
        admin = db.exec(select(User)).one()
        assert admin.password_hash.startswith("$argon2id$")
        assert ADMIN_PASSWORD not in admin.password_hash
    assert "auth.login" in audit_actions(app)
    page = await client.get("/panel/dashboard")
    assert page.status_code == 200
    assert "Main street" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


async def test_wrong_password_is_refused_and_audited(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    response = await sign_in(client, "admin", "not-the-password")

    assert response.status_code == 401
    assert "Wrong user name or password" in response.text
    assert "auth.login_failed" in audit_actions(app)
    assert (await client.get("/panel/dashboard")).status_code == 303


async def test_sign_in_is_rate_limited_even_with_the_right_password(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(5):
        assert (await sign_in(client, "admin", "guess")).status_code == 401

    response = await sign_in(client)

    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.text


async def test_sign_in_form_without_its_csrf_token_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/panel/login", data={"username": "admin", "password": ADMIN_PASSWORD}
    )

    assert response.status_code == 403
    assert "qrpark_session" not in response.headers.get("set-cookie", "")


async def test_cross_site_form_post_is_refused(
    client: httpx.AsyncClient, app: FastAPI, broker: object
) -> None:
    token = await signed_in(client)

    without_token = await client.post("/panel/gates/lot1/in1/open", data={"reason": "tailgate"})
    other_site = await client.post(
        "/panel/gates/lot1/in1/open",
        data={"reason": "tailgate", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    fetch_metadata = await client.post(
        "/panel/gates/lot1/in1/open",
        data={"reason": "tailgate", "csrf_token": token},
        headers={"Sec-Fetch-Site": "cross-site"},
    )

    assert without_token.status_code == 403
    assert other_site.status_code == 403
    assert fetch_metadata.status_code == 403
    assert "gate.manual_open" not in audit_actions(app)


async def test_sign_out_ends_the_session_server_side(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)
    stolen = client.cookies.get("qrpark_session")

    response = await client.post("/panel/logout", data={"csrf_token": token})

    assert response.status_code == 303
    assert "auth.logout" in audit_actions(app)
    client.cookies.set("qrpark_session", stolen or "", path="/panel")
    assert (await client.get("/panel/api/dashboard")).status_code == 401


async def test_an_expired_session_needs_a_new_sign_in(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await signed_in(client)
    clock.advance(timedelta(hours=13))

    assert (await client.get("/panel/api/dashboard")).status_code == 401


def test_production_cookies_are_secure_and_placeholders_refused(tmp_path: object) -> None:
    with pytest.raises(ValidationError, match="admin_password"):
        ServerSettings(environment="production", admin_password="changeme")
    with pytest.raises(ValidationError, match="admin_password"):
        ServerSettings(environment="production", admin_password="short")
    with pytest.raises(ValidationError, match="demo_driver_pin"):
        ServerSettings(environment="production", demo_driver_pin="1234")
    ServerSettings(environment="production", admin_password="a-long-real-secret")


async def test_production_sets_secure_cookies(tmp_path: object, clock: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    settings = ServerSettings(
        environment="production",
        database_url=f"sqlite:///{base / 'p.db'}",
        key_file=base / "k.pem",
        admin_password="a-long-real-secret",
        mqtt_enabled=False,
    )
    app = create_app(settings, clock=clock)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://test") as http:
            page = await http.get("/panel/login")
            assert "Secure" in page.headers["set-cookie"]
            response = await http.post(
                "/panel/login",
                data={
                    "username": "admin",
                    "password": "a-long-real-secret",
                    "csrf_token": form_token(page.text),
                },
            )
            assert response.status_code == 303
            assert "Secure" in response.headers["set-cookie"]
            assert (await http.get("/panel/dashboard")).status_code == 200
            # the old driver page without sign-in is not served in production
            legacy = await http.get("/driver/alice")
            assert legacy.status_code == 303
            assert legacy.headers["location"] == "/driver/login?account=alice"


async def test_the_first_admin_is_created_once(client: httpx.AsyncClient, app: FastAPI) -> None:
    panel = app.state.panel

    assert panel.bootstrap_admin() is False  # users exist: settings never override them
    with central_of(app).db() as db:
        assert len(db.exec(select(User)).all()) == 1
        assert [e.action for e in audit.list_entries(db, action="user.bootstrap")] == [
            "user.bootstrap"
        ]
