"""The Tariffs page: versions, a preview calculator, and new versions for admins only."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from panel_support import add_user, central_of, signed_in

from server.audit import service as audit
from server.auth.models import Role
from server.pricing import service as pricing

DRAFT = {
    "grace_minutes": "10",
    "increment_minutes": "30",
    "increment": "3.00",
    "daily_cap": "40.00",
    "cap_period": "calendar_day",
    "entry_at": "2026-03-02T09:00",
    "exit_at": "2026-03-02T11:30",
    "effective_from": "2026-04-01T00:00",
    "note": "2026 price review",
}


def versions(app: FastAPI) -> list[int]:
    with central_of(app).db() as db:
        return [v.version for v in pricing.list_versions(db, "lot1")]


async def test_preview_prices_a_draft_without_storing_it(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    add_user(app, "vera", Role.VIEWER)
    token = await signed_in(client, "vera", "password-123")
    before = versions(app)

    page = await client.post("/panel/tariffs/lot1/preview", data={**DRAFT, "csrf_token": token})

    assert page.status_code == 200
    # 2 h 30 min: 10 min grace does not apply past itself; 5 started half hours x 3.00
    assert "would cost" in page.text
    assert "¥15.00" in page.text
    assert "Only an admin can create tariff versions" in page.text
    assert versions(app) == before


async def test_a_viewer_or_operator_cannot_create_a_tariff_version(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    token = await signed_in(client, "otto", "password-123")
    before = versions(app)

    response = await client.post(
        "/panel/tariffs/lot1/versions", data={**DRAFT, "csrf_token": token}
    )

    assert response.status_code == 403
    assert versions(app) == before


async def test_admin_creates_a_future_version_and_it_is_audited(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)
    before = versions(app)

    response = await client.post(
        "/panel/tariffs/lot1/versions", data={**DRAFT, "csrf_token": token}
    )
    page = await client.get("/panel/tariffs", params={"lot": "lot1"})

    assert response.status_code == 303
    assert len(versions(app)) == len(before) + 1
    assert "scheduled" in page.text and "2026 price review" in page.text
    with central_of(app).db() as db:
        [entry] = audit.list_entries(db, action="tariff.create_version")
    assert (entry.actor, entry.target_id, entry.reason) == (
        "user:admin",
        "lot1",
        "2026 price review",
    )
    assert entry.details["tariff"]["increment_minor"] == 300


async def test_a_retroactive_version_is_refused_with_the_form_kept(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)
    before = versions(app)

    page = await client.post(
        "/panel/tariffs/lot1/versions",
        data={**DRAFT, "effective_from": "2025-01-01T00:00", "csrf_token": token},
    )

    assert page.status_code == 200
    assert "never retroactive" in page.text
    assert 'value="2026 price review"' in page.text
    assert versions(app) == before
