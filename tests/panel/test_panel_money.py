"""The Money page, refunds, CSV exports, permits and receipts in the operator panel."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from panel_support import (
    TARIFF,
    add_user,
    central_of,
    form_token,
    park,
    scan_at,
    signed_in,
)
from sqlmodel import select

from parking_protocol.clock import FakeClock
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.accounts import book
from server.accounts.ledger import refunds_account, revenue_account, wallet_account
from server.accounts.models import AccountCreate
from server.audit import service as audit
from server.auth.models import Role
from server.gateways.models import GateCreate
from server.lots.models import LotCreate
from server.panel import charts
from server.panel.money import csv_bytes
from server.panel.templating import money, short_id
from server.payments.models import Permit, Refund


def ledger(app: FastAPI, ledger_account: str) -> int:
    with central_of(app).db() as db:
        return book.balance_of(db, ledger_account, "CNY")


def entries(app: FastAPI, action: str) -> list[audit.AuditRead]:
    with central_of(app).db() as db:
        return audit.list_entries(db, action=action)


def refunds(app: FastAPI) -> list[Refund]:
    with central_of(app).db() as db:
        return list(db.exec(select(Refund)).all())


def lot_row(html: str, lot_id: str) -> str:
    found = re.search(rf'<tr data-lot="{lot_id}">(.*?)</tr>', html, re.S)
    assert found, f"no row for {lot_id}"
    return found.group(1)


def parse_csv(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline="")))


async def refund_form(client: httpx.AsyncClient, session_id: str, **fields: str) -> httpx.Response:
    """Submit the refund form of the session's page as a browser would."""
    detail = await client.get(f"/panel/sessions/{session_id}")
    key = re.search(r'name="key" value="([^"]+)"', detail.text)
    assert key, "no refund form on the session page"
    data = {"csrf_token": form_token(detail.text), "key": key.group(1), **fields}
    return await client.post(f"/panel/sessions/{session_id}/refund", data=data)


# -- the page --------------------------------------------------------------------------------------
async def test_money_page_shows_per_lot_and_per_day_revenue_that_matches_the_ledger(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    central = central_of(app)
    central.topup("bob", 10_000, idempotency_key="bob")
    await park(app, broker, clock, "alice", stay=timedelta(hours=2))  # ¥10.00
    await park(app, broker, clock, "bob", stay=timedelta(hours=3, minutes=30))  # ¥20.00
    clock.advance(timedelta(days=1))
    await park(app, broker, clock, "alice", stay=timedelta(minutes=50))  # ¥5.00 the next day
    await signed_in(client)

    page = await client.get("/panel/money")

    assert page.status_code == 200
    earned = ledger(app, revenue_account("lot1")) + ledger(app, refunds_account("lot1"))
    assert earned == 3_500
    assert money(earned) in lot_row(page.text, "lot1")
    assert f'id="net-CNY">{money(earned)}<' in page.text
    assert 'id="chart-days-CNY"' in page.text
    assert 'id="chart-lots-CNY"' in page.text
    days = re.findall(r"<title>Main street, (\d\d-\d\d): ([^<]+)</title>", page.text)
    assert days == [("03-02", "¥30.00"), ("03-03", "¥5.00")]
    assert 'title="Main street: ¥35.00"' in page.text
    assert page.text.count('<tr data-lot="') == 1  # lot2 earned nothing
    assert "https://" not in page.text  # nothing fetched from elsewhere
    old = await client.get("/panel/money", params={"since": "2026-02-01", "until": "2026-02-28"})
    assert 'id="no-revenue"' in old.text


async def test_money_page_lists_outstanding_debts(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    central = central_of(app)
    central.create_lot(
        LotCreate(
            lot_id="lot3", name="Later Lane", capacity=5, tariff=TARIFF, payment_policy="pay_later"
        )
    )
    central.create_gate("lot3", GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate("lot3", GateCreate(gate_id="out1", direction=Direction.EXIT))
    central.create_account(AccountCreate(account_id="carol", name="Carol"))
    await signed_in(client)
    stay = await park(app, broker, clock, "carol", stay=timedelta(hours=2), lot_id="lot3")

    page = await client.get("/panel/money")
    account = await client.get("/panel/accounts/carol")

    assert stay.settlement == "owed"
    assert 'id="owed-CNY" class="neg">¥10.00<' in page.text
    debts = page.text.split('id="debts"')[1].split("</table>")[0]
    assert "carol" in debts and short_id(stay.session_id) in debts
    assert 'id="debt-total">¥10.00<' in account.text


# -- CSV -------------------------------------------------------------------------------------------
def test_csv_quotes_commas_quotes_and_newlines_and_defuses_formulas() -> None:
    body = csv_bytes(
        ["a", "b", "c", "d"],
        [['He said "hi", then left', "two\nlines", '=HYPERLINK("x")', -5], [None, True, "", 7]],
    )

    assert body.startswith("\ufeff".encode())
    assert b"\r\n" in body
    rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"), newline="")))
    assert rows == [
        ["a", "b", "c", "d"],
        ['He said "hi", then left', "two\nlines", '\'=HYPERLINK("x")', "-5"],
        ["", "true", "", "7"],
    ]


async def test_payments_and_sessions_export_as_csv_with_the_current_filters(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    alice = await park(app, broker, clock, "alice", stay=timedelta(hours=2))
    clock.advance(timedelta(days=2))
    later = await park(app, broker, clock, "alice", stay=timedelta(hours=1))
    await signed_in(client)

    payments = await client.get(
        "/panel/export/payments.csv",
        params={"lot": "lot1", "since": "2026-03-02", "until": "2026-03-02"},
    )
    sessions = await client.get(
        "/panel/export/sessions.csv", params={"lot": "lot1", "state": "closed"}
    )
    other_lot = await client.get("/panel/export/payments.csv", params={"lot": "lot2"})

    assert payments.status_code == 200
    assert payments.headers["content-type"] == "text/csv; charset=utf-8"
    assert payments.headers["content-disposition"] == (
        'attachment; filename="qrpark-payments-2026-03-02-2026-03-02.csv"'
    )
    [row] = parse_csv(payments.content)
    assert (row["session_id"], row["account_id"], row["lot_id"]) == (
        alice.session_id,
        "alice",
        "lot1",
    )
    assert (row["method"], row["status"], row["amount_minor"], row["amount"]) == (
        "wallet",
        "captured",
        "1000",
        "10.00",
    )
    assert row["created_at"].startswith("2026-03-02T10:00:00")
    assert sessions.headers["content-disposition"].startswith("attachment; filename=")
    rows = parse_csv(sessions.content)
    assert [r["session_id"] for r in rows] == [later.session_id, alice.session_id]
    assert rows[1]["duration_s"] == "7200" and rows[1]["amount"] == "10.00"
    assert parse_csv(other_lot.content) == []
    [export] = entries(app, "export.sessions")
    assert export.actor == "user:admin" and export.details["rows"] == 2


async def test_the_export_links_carry_the_page_filters(
    client: httpx.AsyncClient,
) -> None:
    await signed_in(client)

    money_page = await client.get(
        "/panel/money", params={"lot": "lot1", "since": "2026-03-01", "until": "2026-03-02"}
    )
    sessions_page = await client.get("/panel/sessions", params={"account": "a b", "state": "open"})

    assert (
        'href="/panel/export/payments.csv?lot=lot1&amp;since=2026-03-01&amp;until=2026-03-02"'
        in (money_page.text)
    )
    assert "/panel/export/sessions.csv?account=a%20b&amp;state=open&amp;" in sessions_page.text


# -- refunds ---------------------------------------------------------------------------------------
async def test_an_operator_refunds_part_then_the_rest_audited_and_posted_to_the_ledger(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    await signed_in(client, "otto", "password-123")
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))  # ¥10.00
    wallet_before = ledger(app, wallet_account("alice"))

    partial = await refund_form(
        client, stay.session_id, amount="3.50", reason="Barrier hit the car"
    )
    rest = await refund_form(client, stay.session_id, amount="", reason="Goodwill, rest of it")

    assert partial.status_code == rest.status_code == 303
    assert [r.amount_minor for r in sorted(refunds(app), key=lambda r: r.amount_minor)] == [
        350,
        650,
    ]
    assert ledger(app, refunds_account("lot1")) == -1_000
    assert ledger(app, wallet_account("alice")) == wallet_before + 1_000
    logged = entries(app, "payment.refund")
    assert [(e.actor, e.target_id, e.reason, e.details["amount_minor"]) for e in logged] == [
        ("user:otto", stay.session_id, "Goodwill, rest of it", 650),
        ("user:otto", stay.session_id, "Barrier hit the car", 350),
    ]
    detail = await client.get(f"/panel/sessions/{stay.session_id}")
    assert "¥6.50 refunded on session" in detail.text  # the notice of the last action
    assert 'id="refunded-total">¥10.00<' in detail.text
    assert "Nothing paid on this session is left to refund" in detail.text
    page = await client.get("/panel/money")
    listed = page.text.split('id="refunds"')[1].split("</table>")[0]
    assert "Barrier hit the car" in listed and "user:otto" in listed
    assert f'id="net-CNY">{money(0)}<' in page.text


async def test_a_resubmitted_refund_form_refunds_once(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    token = await signed_in(client)
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))
    form = {"csrf_token": token, "key": "form-1", "amount": "2.00", "reason": "double click"}

    first = await client.post(f"/panel/sessions/{stay.session_id}/refund", data=form)
    again = await client.post(f"/panel/sessions/{stay.session_id}/refund", data=form)

    assert first.status_code == again.status_code == 303
    assert [r.amount_minor for r in refunds(app)] == [200]
    assert "was already refunded" in (await client.get("/panel/money")).text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"amount": "1.00", "reason": ""}, "a reason (at least 3 characters) is required"),
        ({"amount": "50.00", "reason": "too much"}, "at most 1000 minor units"),
        ({"amount": "1.005", "reason": "fractions"}, "at most 2 decimals"),
        ({"amount": "0", "reason": "nothing"}, "more than zero"),
    ],
)
async def test_a_refund_that_cannot_be_done_says_why_and_changes_nothing(
    client: httpx.AsyncClient,
    app: FastAPI,
    broker: InMemoryBroker,
    clock: FakeClock,
    fields: dict[str, str],
    message: str,
) -> None:
    await signed_in(client)
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))

    response = await refund_form(client, stay.session_id, **fields)

    assert response.status_code == 303
    page = await client.get(response.headers["location"])
    assert message in page.text
    assert refunds(app) == []
    assert entries(app, "payment.refund") == []


async def test_a_viewer_sees_money_but_cannot_refund_or_grant_a_permit(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))
    add_user(app, "vera", Role.VIEWER)
    token = await signed_in(client, "vera", "password-123")

    money_page = await client.get("/panel/money")
    detail = await client.get(f"/panel/sessions/{stay.session_id}")
    account = await client.get("/panel/accounts/alice")
    refund = await client.post(
        f"/panel/sessions/{stay.session_id}/refund",
        data={"csrf_token": token, "reason": "I am only a viewer"},
    )
    permit = await client.post(
        "/panel/accounts/alice/permits",
        data={
            "csrf_token": token,
            "lots": "lot1",
            "valid_from": "2026-03-02T00:00",
            "valid_until": "2026-04-01T00:00",
            "reason": "I am only a viewer",
        },
    )

    assert money_page.status_code == detail.status_code == account.status_code == 200
    assert "Refund…" not in money_page.text and "refund-form" not in money_page.text
    assert 'id="refund-form"' not in detail.text
    assert "can look at payments but not refund them" in detail.text
    assert 'id="permit-form"' not in account.text
    assert (refund.status_code, permit.status_code) == (403, 403)
    assert "needs the operator role" in refund.text
    assert refunds(app) == []
    with central_of(app).db() as db:
        assert list(db.exec(select(Permit)).all()) == []
    assert entries(app, "payment.refund") == entries(app, "permit.grant") == []


async def test_a_refund_without_the_csrf_token_or_from_another_site_is_refused(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    token = await signed_in(client)
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))
    url = f"/panel/sessions/{stay.session_id}/refund"

    no_token = await client.post(url, data={"reason": "forged"})
    wrong_token = await client.post(url, data={"reason": "forged", "csrf_token": "x" * 43})
    cross_site = await client.post(
        url,
        data={"reason": "forged", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    permit = await client.post(
        "/panel/accounts/alice/permits", data={"lots": "lot1", "reason": "forged"}
    )

    assert [r.status_code for r in (no_token, wrong_token, cross_site, permit)] == [403] * 4
    assert "cross-site request refused" in cross_site.text
    assert refunds(app) == []


# -- permits ---------------------------------------------------------------------------------------
async def test_an_operator_grants_a_free_permit_and_the_next_stay_costs_nothing(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    await signed_in(client, "otto", "password-123")
    account = await client.get("/panel/accounts/bob")

    granted = await client.post(
        "/panel/accounts/bob/permits",
        data={
            "csrf_token": form_token(account.text),
            "lots": ["lot1", "lot2"],
            "valid_from": "2026-03-01T00:00",
            "valid_until": "2026-04-01T00:00",
            "pricing": "free",
            "reason": "Monthly pass, paid at the office",
        },
    )
    stay = await park(app, broker, clock, "bob", stay=timedelta(hours=3))

    assert granted.status_code == 303
    [entry] = entries(app, "permit.grant")
    assert (entry.actor, entry.target_id, entry.reason) == (
        "user:otto",
        "bob",
        "Monthly pass, paid at the office",
    )
    assert entry.details["lots"] == ["lot1", "lot2"]
    assert entry.details["valid_from"] == "2026-02-28T16:00:00+00:00"  # Shanghai midnight
    assert entry.details["tariff"] is None
    assert stay.amount is not None and stay.amount.amount_minor == 0
    page = await client.get("/panel/accounts/bob")
    assert "Permit for Main street, Station (free parking)" in page.text
    permits = page.text.split('id="permits"')[1].split("</table>")[0]
    assert "Main street, Station" in permits and "active" in permits and "free" in permits


async def test_a_permit_with_its_own_tariff_prices_the_stay_with_it(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    token = await signed_in(client)

    await client.post(
        "/panel/accounts/alice/permits",
        data={
            "csrf_token": token,
            "lots": "lot1",
            "valid_from": "2026-03-01T00:00",
            "valid_until": "2026-03-31T00:00",
            "pricing": "tariff",
            "hourly": "2.00",
            "daily_cap": "10",
            "reason": "Resident rate",
        },
    )
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=3))

    [permit] = entries(app, "permit.grant")
    assert permit.details["tariff"]["hourly_minor"] == 200
    assert permit.details["tariff"]["daily_cap_minor"] == 1_000
    assert stay.amount is not None and stay.amount.amount_minor == 600
    page = await client.get("/panel/accounts/alice")
    assert "¥2.00 / 60 min, cap ¥10.00" in page.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lots": [], "reason": "no lots"}, "choose at least one lot"),
        ({"lots": "nowhere", "reason": "bad lot"}, "no such lot: nowhere"),
        ({"lots": "lot1", "reason": "x"}, "a reason (at least 3 characters) is required"),
        (
            {"lots": "lot1", "reason": "backwards", "valid_until": "2026-02-01T00:00"},
            "valid_until must be after valid_from",
        ),
        ({"lots": "lot1", "reason": "no rate", "pricing": "tariff"}, "hourly rate: not an amount"),
    ],
)
async def test_a_permit_form_that_does_not_make_sense_is_refused_with_a_reason(
    client: httpx.AsyncClient, app: FastAPI, fields: dict[str, object], message: str
) -> None:
    token = await signed_in(client)
    data: dict[str, object] = {
        "csrf_token": token,
        "valid_from": "2026-03-01T00:00",
        "valid_until": "2026-03-31T00:00",
        **fields,
    }

    response = await client.post("/panel/accounts/alice/permits", data=data)  # type: ignore[arg-type]

    assert response.status_code == 303
    assert message in (await client.get("/panel/accounts/alice")).text
    assert entries(app, "permit.grant") == []


# -- receipts --------------------------------------------------------------------------------------
async def test_a_closed_session_links_its_printable_receipt_and_shows_how_it_was_paid(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    await signed_in(client)
    stay = await park(app, broker, clock, "alice", stay=timedelta(hours=2))
    await park(app, broker, clock, "bob", stay=timedelta(minutes=5))  # within the grace: free

    detail = await client.get(f"/panel/sessions/{stay.session_id}")
    printable = await client.get(f"/receipts/{stay.session_id}")
    free = await client.get(
        f"/panel/sessions/{central_of(app).list_sessions(account_id='bob')[0].session_id}"
    )

    assert f'href="/receipts/{stay.session_id}"' in detail.text
    assert 'id="payment-method">wallet<' in detail.text
    assert "not available yet" not in detail.text
    assert printable.status_code == 200 and "¥10.00" in printable.text
    assert 'id="payment-method">no payment needed<' in free.text


async def test_an_open_session_has_no_receipt_yet(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:

    await signed_in(client)
    await scan_at(
        app, broker, lot_id="lot1", gate_id="in1", direction=Direction.ENTRY, account_id="alice"
    )
    [inside] = central_of(app).list_sessions(account_id="alice")

    detail = await client.get(f"/panel/sessions/{inside.session_id}")

    assert "The receipt is issued when the car leaves." in detail.text
    assert 'id="receipt-link"' not in detail.text


# -- charts ----------------------------------------------------------------------------------------
def test_chart_steps_are_round_numbers_covering_the_top() -> None:
    assert [charts.nice_step(top, unit=100) for top in (0, 350, 999, 3_500, 12_345)] == [
        100,
        100,
        250,
        1_000,
        5_000,
    ]


def test_columns_stack_lots_per_day_and_draw_negative_days_as_empty() -> None:
    chart = charts.columns(
        ["03-01", "03-02", "03-03"],
        [charts.Series("A", (100, 0, -50)), charts.Series("B", (300, 200, 0))],
        label=str,
    )

    first_day = [b for b in chart.bars if b.title.endswith("03-01: 100") or "03-01" in b.title]
    assert [b.title for b in first_day] == ["A, 03-01: 100", "B, 03-01: 300"]
    assert first_day[1].y + first_day[1].height == pytest.approx(first_day[0].y)  # stacked
    assert not any("03-03" in b.title for b in chart.bars)
    assert chart.ticks[-1].text == "400" and not chart.empty
    assert chart.legend == (("#2563eb", "A"), ("#0d9488", "B"))
    assert charts.columns(["x"], [charts.Series("A", (0,))], label=str).empty
