"""Who may call the REST API: tokens with roles, the panel's and the driver page's cookies,
CSRF on cookie writes, rate limits and in-flight idempotency keys (ASGI app, SQLite)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_support import API_TOKEN, AUTH
from fastapi import FastAPI
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.transport import InMemoryBroker
from server.audit.models import AuditEntry
from server.auth.models import ApiToken
from server.central import Central
from server.config import ServerSettings
from server.db import make_engine, upgrade
from server.errors import ConflictError
from server.idempotency import STALE_AFTER, InFlightKey, in_flight
from server.main import create_app

ADMIN_PASSWORD = "correct-horse-battery"
LOT = {
    "lot_id": "lot1",
    "name": "Main street",
    "capacity": 10,
    "tariff": {"grace_minutes": 15, "hourly_minor": 500, "daily_cap_minor": 6000},
}
PUBLIC = {("GET", "/api/v1/keys")}
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PAGE_CSRF = re.compile(r'data-csrf="([^"]+)"')


@pytest.fixture
def app(sqlite_url: str, tmp_path: Path, clock: FakeClock, broker: InMemoryBroker) -> FastAPI:
    settings = ServerSettings(
        database_url=sqlite_url,
        key_file=tmp_path / "keys" / "signing.pem",
        bootstrap_api_token=API_TOKEN,
        admin_password=ADMIN_PASSWORD,
        demo_driver_pin="2468",
        code_burst=3,
        code_rate_per_minute=6,
    )
    return create_app(settings, clock=clock, transport=broker.client("central"))


@pytest.fixture
async def anon(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.fixture
async def admin(anon: httpx.AsyncClient) -> httpx.AsyncClient:
    """The same app as ``anon``; seeded with a lot, two gates and alice with ¥100."""
    await anon.post("/api/v1/lots", json=LOT, headers=AUTH)
    for gate_id, direction in (("in1", "entry"), ("out1", "exit")):
        await anon.post(
            "/api/v1/lots/lot1/gates",
            json={"gate_id": gate_id, "direction": direction},
            headers=AUTH,
        )
    await anon.post("/api/v1/accounts", json={"account_id": "alice", "name": "A"}, headers=AUTH)
    await anon.post("/api/v1/accounts", json={"account_id": "bob", "name": "B"}, headers=AUTH)
    response = await anon.post(
        "/api/v1/accounts/alice/topups",
        json={"amount_minor": 10_000},
        headers={**AUTH, "Idempotency-Key": "seed"},
    )
    assert response.status_code == 201, response.text
    return anon


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_token(client: httpx.AsyncClient, role: str, name: str | None = None) -> str:
    response = await client.post(
        "/api/v1/tokens", json={"name": name or f"{role}-bot", "role": role}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def central_of(app: FastAPI) -> Central:
    central: Central = app.state.central
    return central


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        if path.startswith("/api/v1")
        for method in item
    ]


# -- authentication -----------------------------------------------------------------------------
async def test_anonymous_callers_get_401_on_every_protected_api_route(
    app: FastAPI, anon: httpx.AsyncClient
) -> None:
    routes = api_routes(app)
    families = {path.split("/")[3] for _method, path in routes}
    assert {"lots", "accounts", "sessions", "permits", "tokens"} <= families

    for method, path in routes:
        url = re.sub(r"\{[^}]+\}", "x", path)
        response = await anon.request(method, url, json={}, headers={"Idempotency-Key": "k"})
        if (method, path) in PUBLIC:
            assert response.status_code == 200, (method, path)
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_health_readiness_keys_and_driver_sign_in_need_no_credentials(
    anon: httpx.AsyncClient,
) -> None:
    assert (await anon.get("/health")).status_code == 200
    assert (await anon.get("/ready")).status_code == 200
    assert (await anon.get("/api/v1/keys")).json()["keys"]
    assert (await anon.get("/driver/login")).status_code == 200


async def test_a_wrong_or_malformed_token_is_401_not_anonymous(admin: httpx.AsyncClient) -> None:
    for header in ("Bearer qrp_nope", "Basic YWRtaW46YWRtaW4=", "Bearer"):
        response = await admin.get("/api/v1/lots", headers={"Authorization": header})
        assert response.status_code == 401, header


async def test_a_viewer_token_reads_but_cannot_move_money_gates_or_tariffs(
    admin: httpx.AsyncClient,
) -> None:
    viewer = bearer(await new_token(admin, "viewer"))

    assert (await admin.get("/api/v1/lots", headers=viewer)).status_code == 200
    assert (await admin.get("/api/v1/accounts/alice", headers=viewer)).status_code == 200
    assert (await admin.get("/api/v1/sessions", headers=viewer)).status_code == 200
    refused = [
        await admin.post(
            "/api/v1/accounts/alice/topups",
            json={"amount_minor": 100},
            headers={**viewer, "Idempotency-Key": "v1"},
        ),
        await admin.post(
            "/api/v1/sessions/any/refunds",
            json={"reason": "goodwill"},
            headers={**viewer, "Idempotency-Key": "v2"},
        ),
        await admin.post(
            "/api/v1/lots/lot1/gates/in1/open", json={"reason": "stuck"}, headers=viewer
        ),
        await admin.post(
            "/api/v1/lots/lot1/tariffs", json={"tariff": {"hourly_minor": 1}}, headers=viewer
        ),
        await admin.post("/api/v1/accounts/alice/codes", headers=viewer),
        await admin.post("/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=viewer),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert "operator" in refused[0].json()["detail"]
    balance = (await admin.get("/api/v1/accounts/alice", headers=viewer)).json()
    assert balance["balance_minor"] == 10_000


async def test_an_operator_token_operates_but_cannot_change_tariffs_lots_or_tokens(
    admin: httpx.AsyncClient, app: FastAPI
) -> None:
    operator = bearer(await new_token(admin, "operator", "desk"))

    topup = await admin.post(
        "/api/v1/accounts/alice/topups",
        json={"amount_minor": 500},
        headers={**operator, "Idempotency-Key": "op-1"},
    )
    opened = await admin.post(
        "/api/v1/lots/lot1/gates/in1/open", json={"reason": "barrier stuck"}, headers=operator
    )
    blocked = await admin.post(
        "/api/v1/accounts/bob/block", json={"blocked": True, "reason": "stolen"}, headers=operator
    )
    code = await admin.post("/api/v1/accounts/alice/codes", headers=operator)

    assert (topup.status_code, opened.status_code, blocked.status_code) == (201, 202, 200)
    assert opened.json()["command_id"]
    assert code.status_code == 201
    for method, url, body in (
        ("POST", "/api/v1/lots/lot1/tariffs", {"tariff": {"hourly_minor": 1}}),
        ("POST", "/api/v1/lots", {**LOT, "lot_id": "lot9"}),
        ("POST", "/api/v1/lots/lot1/gates", {"gate_id": "in9", "direction": "entry"}),
        ("POST", "/api/v1/tokens", {"name": "x", "role": "viewer"}),
        ("GET", "/api/v1/tokens", None),
    ):
        response = await admin.request(method, url, json=body, headers=operator)
        assert response.status_code == 403, (method, url)
    with central_of(app).db() as db:
        actions = {
            (e.actor, e.action) for e in db.exec(select(AuditEntry).where(AuditEntry.actor != ""))
        }
    assert ("token:desk", "account.topup") in actions
    assert ("token:desk", "gate.manual_open") in actions
    assert ("token:desk", "account.block") in actions


async def test_tokens_are_stored_hashed_listed_without_secret_and_revocable(
    admin: httpx.AsyncClient, app: FastAPI
) -> None:
    created = await admin.post(
        "/api/v1/tokens", json={"name": "ci", "role": "viewer"}, headers=AUTH
    )
    body = created.json()
    secret, token_id = body["token"], body["token_id"]
    assert secret.startswith("qrp_")

    listed = (await admin.get("/api/v1/tokens", headers=AUTH)).json()
    assert {t["name"] for t in listed} == {"bootstrap", "ci"}
    assert all("token" not in t for t in listed)
    with central_of(app).db() as db:
        stored = db.get(ApiToken, token_id)
        assert stored is not None and secret not in stored.token_hash
    assert (await admin.get("/api/v1/lots", headers=bearer(secret))).status_code == 200

    revoked = await admin.delete(f"/api/v1/tokens/{token_id}", headers=AUTH)

    assert revoked.status_code == 204
    assert (await admin.get("/api/v1/lots", headers=bearer(secret))).status_code == 401
    assert (await admin.delete(f"/api/v1/tokens/{token_id}", headers=AUTH)).status_code == 409
    assert (await admin.delete("/api/v1/tokens/nope", headers=AUTH)).status_code == 404
    with central_of(app).db() as db:
        audited = [
            e.action for e in db.exec(select(AuditEntry).where(AuditEntry.target_id == token_id))
        ]
    assert audited == ["token.create", "token.revoke"]


async def test_a_revoked_bootstrap_token_stays_revoked_after_a_restart(
    app: FastAPI, admin: httpx.AsyncClient
) -> None:
    other = bearer(await new_token(admin, "admin", "root2"))
    [boot] = [
        t
        for t in (await admin.get("/api/v1/tokens", headers=other)).json()
        if t["name"] == "bootstrap"
    ]
    await admin.delete(f"/api/v1/tokens/{boot['token_id']}", headers=other)
    assert (await admin.get("/api/v1/lots", headers=AUTH)).status_code == 401

    from server.main import _bootstrap_token

    _bootstrap_token(central_of(app))  # what the next start does

    assert (await admin.get("/api/v1/lots", headers=AUTH)).status_code == 401


def test_production_refuses_a_placeholder_bootstrap_token() -> None:
    for weak in ("changeme", "short-token", "qrp_compose-demo-token-change-me-in-production"):
        with pytest.raises(ValueError, match="bootstrap_api_token"):
            ServerSettings(environment="production", bootstrap_api_token=weak)
    ServerSettings(environment="production", bootstrap_api_token="qrp_" + "k" * 40)


# -- cookies: the panel's user and the driver -----------------------------------------------------
async def panel_cookie(client: httpx.AsyncClient) -> tuple[str, str]:
    """Sign in to the panel as admin; return the session cookie and its CSRF token."""
    login = await client.get("/panel/login")
    token = _CSRF.search(login.text)
    assert token is not None
    response = await client.post(
        "/panel/login",
        data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token.group(1)},
    )
    assert response.status_code == 303, response.text
    page = await client.get("/panel/dashboard")
    csrf = _PAGE_CSRF.search(page.text)
    assert csrf is not None
    cookie = client.cookies.get("qrpark_session")
    assert cookie is not None
    client.cookies.clear()
    return cookie, csrf.group(1)


async def test_a_panel_cookie_write_needs_same_site_and_the_csrf_token(
    admin: httpx.AsyncClient,
) -> None:
    cookie, csrf = await panel_cookie(admin)
    jar = {"Cookie": f"qrpark_session={cookie}"}
    body = {**LOT, "lot_id": "lot2"}

    assert (await admin.get("/api/v1/lots", headers=jar)).status_code == 200
    cross_site = await admin.post(
        "/api/v1/lots",
        json=body,
        headers={**jar, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    no_token = await admin.post("/api/v1/lots", json=body, headers=jar)
    assert (cross_site.status_code, no_token.status_code) == (403, 403)
    assert "cross-site" in cross_site.json()["detail"]

    same_site = await admin.post(
        "/api/v1/lots", json=body, headers={**jar, "X-CSRF-Token": csrf, "Origin": "http://test"}
    )
    assert same_site.status_code == 201, same_site.text
    # a panel user cannot mint a driver's code: only the driver or an operator/admin token
    minted = await admin.post("/api/v1/accounts/alice/codes", headers={**jar, "X-CSRF-Token": csrf})
    assert minted.status_code == 403


async def driver_cookie(client: httpx.AsyncClient, account: str) -> tuple[str, str]:
    login = await client.get("/driver/login")
    token = _CSRF.search(login.text)
    assert token is not None
    response = await client.post(
        "/driver/login",
        data={"account_id": account, "pin": "2468", "csrf_token": token.group(1)},
    )
    assert response.status_code == 303, response.text
    page = await client.get("/driver")
    csrf = re.search(r'(?:data-csrf|csrf_token)[^"]*"([^"]{20,})"', page.text)
    assert csrf is not None
    cookie = client.cookies.get("qrpark_driver")
    assert cookie is not None
    client.cookies.clear()
    return cookie, csrf.group(1)


async def test_a_signed_in_driver_reads_their_account_and_issues_only_their_codes(
    admin: httpx.AsyncClient,
) -> None:
    cookie, csrf = await driver_cookie(admin, "alice")
    jar = {"Cookie": f"qrpark_driver={cookie}"}

    assert (await admin.get("/api/v1/accounts/alice", headers=jar)).status_code == 200
    assert (await admin.get("/api/v1/accounts/bob", headers=jar)).status_code == 403
    assert (await admin.get("/api/v1/lots", headers=jar)).status_code == 403
    mine = await admin.post("/api/v1/accounts/alice/codes", headers={**jar, "X-CSRF-Token": csrf})
    theirs = await admin.post("/api/v1/accounts/bob/codes", headers={**jar, "X-CSRF-Token": csrf})
    no_csrf = await admin.post("/api/v1/accounts/alice/codes", headers=jar)
    topup = await admin.post(
        "/api/v1/accounts/alice/topups",
        json={"amount_minor": 100},
        headers={**jar, "X-CSRF-Token": csrf, "Idempotency-Key": "self-credit"},
    )

    assert mine.status_code == 201
    assert (theirs.status_code, no_csrf.status_code, topup.status_code) == (403, 403, 403)
    assert (await admin.get("/api/v1/accounts/alice/code.svg", headers=jar)).status_code == 200


# -- rate limits --------------------------------------------------------------------------------
async def test_code_issuing_is_rate_limited_per_account_with_retry_after(
    admin: httpx.AsyncClient, clock: FakeClock
) -> None:
    statuses = [
        (await admin.post("/api/v1/accounts/alice/codes", headers=AUTH)).status_code
        for _ in range(3)
    ]
    limited = await admin.post("/api/v1/accounts/alice/codes", headers=AUTH)
    other = await admin.post("/api/v1/accounts/bob/codes", headers=AUTH)

    assert statuses == [201, 201, 201]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) == 10  # 6 a minute
    assert other.status_code == 201  # per account
    clock.advance(timedelta(seconds=10))
    assert (await admin.post("/api/v1/accounts/alice/codes", headers=AUTH)).status_code == 201


async def test_repeated_wrong_tokens_are_throttled_but_a_valid_token_still_works(
    admin: httpx.AsyncClient,
) -> None:
    statuses = [
        (await admin.get("/api/v1/lots", headers=bearer(f"qrp_guess{i}"))).status_code
        for i in range(12)
    ]

    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429, 429]
    throttled = await admin.get("/api/v1/lots", headers=bearer("qrp_guess-again"))
    assert int(throttled.headers["retry-after"]) > 0
    assert (await admin.get("/api/v1/lots", headers=AUTH)).status_code == 200


# -- idempotency keys in flight ------------------------------------------------------------------
async def test_a_topup_whose_key_is_in_flight_is_a_409_then_succeeds_once(
    admin: httpx.AsyncClient, app: FastAPI
) -> None:
    central = central_of(app)
    url, body = "/api/v1/accounts/alice/topups", {"amount_minor": 700}
    headers = {**AUTH, "Idempotency-Key": "busy"}

    with (
        Session(central.engine) as other,
        in_flight(central.engine, other, scope="topup:alice", key="busy", now=central.clock.now()),
    ):
        during = await admin.post(url, json=body, headers=headers)
    after = await admin.post(url, json=body, headers=headers)
    again = await admin.post(url, json=body, headers=headers)

    assert during.status_code == 409
    assert "in flight" in during.json()["detail"]
    assert after.status_code == 201 and "idempotent-replayed" not in after.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert central.balance("alice") == 10_700
    with Session(central.engine) as db:
        assert db.exec(select(InFlightKey)).all() == []


@pytest.mark.parametrize("path", ["payments", "refunds", "validations"])
async def test_session_money_endpoints_refuse_a_key_in_flight(
    admin: httpx.AsyncClient, app: FastAPI, path: str
) -> None:
    central = central_of(app)
    scope = {"payments": "session-pay", "refunds": "refund", "validations": "validation"}[path]
    body: dict[str, Any] = {
        "payments": {},
        "refunds": {"reason": "goodwill"},
        "validations": {"kind": "time_off", "value": 30, "reason": "bought", "merchant": "Cafe"},
    }[path]
    with (
        Session(central.engine) as other,
        in_flight(central.engine, other, scope=f"{scope}:s1", key="k", now=central.clock.now()),
    ):
        response = await admin.post(
            f"/api/v1/sessions/s1/{path}", json=body, headers={**AUTH, "Idempotency-Key": "k"}
        )
    assert response.status_code == 409, response.text
    after = await admin.post(
        f"/api/v1/sessions/s1/{path}", json=body, headers={**AUTH, "Idempotency-Key": "k"}
    )
    assert after.status_code == 404  # released: the request runs (and finds no such session)


@pytest.mark.usefixtures("database_url")
def test_in_flight_markers_exclude_each_other_and_stale_ones_are_taken_over(
    database_url: str, clock: FakeClock
) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with Session(engine) as a, Session(engine) as b:
            with in_flight(engine, a, scope="topup:x", key="k", now=clock.now()):
                with (
                    pytest.raises(ConflictError),
                    in_flight(engine, b, scope="topup:x", key="k", now=clock.now()),
                ):
                    pass
                with in_flight(engine, b, scope="topup:y", key="k", now=clock.now()):
                    pass  # another scope is another key
            with in_flight(engine, b, scope="topup:x", key="k", now=clock.now()):
                pass  # released
            # A crashed request's marker is taken over once stale.
            from server.idempotency import _claim

            assert _claim(engine, "topup:z", "k", "crashed", clock.now())
            later = clock.now() + STALE_AFTER + timedelta(seconds=1)
            with in_flight(engine, b, scope="topup:z", key="k", now=later):
                pass
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(InFlightKey)).scalar() == 0
    finally:
        engine.dispose()
