"""Extreme and malformed input to the panel's filters and forms gets a 4xx or a form error.

The regression cases pin the auditor's finds (dates that overflow ``datetime``, amounts that
overflow ``Decimal`` or build giant integers); the hypothesis tests throw generated dates,
amounts and ids at every GET filter, page id and form field and assert no answer is a 5xx.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from panel_support import park, signed_in

from parking_protocol.clock import FakeClock
from parking_protocol.transport import InMemoryBroker
from server.errors import UnprocessableError
from server.panel.amounts import MAX_MINOR, local_datetime, to_minor
from server.pricing import service as pricing
from server.sessions.models import SessionRead

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

EXTREME_DATES = [
    "9999-12-31",
    "9999-12-31T23:59",
    "9999-12-31T23:59:59.999999-05:00",
    "0001-01-01",
    "0001-01-01T00:00",
    "0001-01-01T00:00+05:00",
    "1969-12-31",
    "1970-01-01T00:00+14:00",
    "2999-12-31",
    "3000-01-01",
    "2026-02-30",
    "2026-03-02T24:00",
    "20260302",
    "2026-W10-1",
    "+12026-03-02",
    "",
    " ",
]
EXTREME_AMOUNTS = [
    "1e10000000",
    "1e100000",
    "-1e10000000",
    "1e-10000000",
    "1E+999999999999999999",
    "NaN",
    "sNaN",
    "-Infinity",
    "Infinity",
    "-0",
    "0.001",
    "12.500000000000000000000000000001",
    "100000000.00",
    "100000000.01",
    "99999999999999999999999999999999",
    "1_000",
    "1,50",
    "\u0663",
    "",
]
_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)),
)
# Half the draws are the known extremes, so every run tries them in every field.
dates = st.one_of(
    st.sampled_from(EXTREME_DATES),
    st.one_of(
        st.dates().map(date.isoformat),
        st.datetimes().map(lambda value: value.isoformat(timespec="minutes")),
        st.datetimes(timezones=_offsets).map(datetime.isoformat),
        st.text(max_size=30),
    ),
)
amounts = st.one_of(
    st.sampled_from(EXTREME_AMOUNTS),
    st.one_of(
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.integers().map(str),
        st.floats().map(repr),
        st.text(max_size=20),
    ),
)
ids = st.one_of(
    st.sampled_from(["lot1", "alice", "in1", "..", ".", "%", "a/b", "x" * 5000]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60),
)
filter_text = st.one_of(ids, dates, st.sampled_from(["", "open", "closed", "0", "-1", "1e9"]))


def no_server_error(response: httpx.Response) -> None:
    request = response.request
    body = request.content.decode(errors="replace")[:300]
    assert response.status_code < 500, (
        f"{request.method} {request.url} {body} -> {response.status_code}: {response.text[:500]}"
    )


@pytest.fixture
async def token(client: httpx.AsyncClient) -> str:
    return await signed_in(client)


@pytest.fixture
async def stay(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> SessionRead:
    return await park(app, broker, clock, "alice", stay=timedelta(hours=3))


# -- the auditor's finds --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("until=9999-12-31", "entered to: a date in the years 1970 to 2999"),
        ("since=0001-01-01T00:00%2B05:00", "entered from: a date in the years 1970 to 2999"),
        ("since=yesterday", "entered from: not a date/time"),
    ],
)
async def test_sessions_search_with_an_impossible_date_says_why(
    client: httpx.AsyncClient, token: str, query: str, message: str
) -> None:
    page = await client.get(f"/panel/sessions?{query}")

    assert page.status_code == 422
    assert "notice bad" in page.text
    assert message in page.text
    assert "No sessions match." in page.text


async def test_money_page_with_an_impossible_date_says_why_and_shows_the_default_days(
    client: httpx.AsyncClient, token: str
) -> None:
    page = await client.get("/panel/money?until=9999-12-31")

    assert page.status_code == 422
    assert "to: a date in the years 1970 to 2999; showing the last 14 days" in page.text
    assert 'name="until" value="2026-03-02"' in page.text  # the default window, shown


@pytest.mark.parametrize(
    "url",
    [
        "/panel/export/sessions.csv?until=9999-12-31",
        "/panel/export/sessions.csv?since=0001-01-01T00:00%2B05:00",
        "/panel/export/payments.csv?until=9999-12-31",
        "/panel/export/payments.csv?since=0001-01-01",
    ],
)
async def test_csv_export_with_an_impossible_date_is_refused(
    client: httpx.AsyncClient, token: str, url: str
) -> None:
    response = await client.get(url)

    assert response.status_code == 422
    assert "a date in the years 1970 to 2999" in response.json()["detail"]


@pytest.mark.parametrize(
    ("increment", "message"),
    [
        ("1e10000000", "rate: at most 100000000.00"),
        ("1e100000", "rate: at most 100000000.00"),
        ("100000000.01", "rate: at most 100000000.00"),
        ("1e-10000000", "rate: at most 2 decimals"),
        ("12.500000000000000000000000000001", "rate: at most 2 decimals"),
        ("sNaN", "rate: not an amount"),
        ("-1", "rate: not negative"),
    ],
)
async def test_tariff_preview_with_an_impossible_rate_shows_a_form_error(
    client: httpx.AsyncClient, app: FastAPI, token: str, increment: str, message: str
) -> None:
    form = {
        "increment": increment,
        "increment_minutes": "60",
        "grace_minutes": "0",
        "entry_at": "2026-03-02T09:00",
        "exit_at": "2026-03-02T10:00",
        "csrf_token": token,
    }
    page = await client.post("/panel/tariffs/lot1/preview", data=form)

    assert page.status_code == 200
    assert message in page.text
    assert "would cost" not in page.text


@pytest.mark.parametrize(
    ("text", "minor"),
    [("12.50", 1250), ("0", 0), ("-0", 0), ("1e2", 10_000), ("100000000.00", MAX_MINOR)],
)
def test_an_amount_in_bounds_becomes_exact_minor_units(text: str, minor: int) -> None:
    assert to_minor(text, "CNY", "amount") == minor


def test_a_yen_amount_is_bounded_in_whole_yen() -> None:
    assert to_minor("10000000000", "JPY", "amount") == MAX_MINOR
    with pytest.raises(UnprocessableError, match="at most 10000000000"):
        to_minor("10000000001", "JPY", "amount")


@pytest.mark.parametrize("text", ["9999-12-31T23:59", "0001-01-01T00:00", "3000-01-01T00:00"])
def test_a_form_time_outside_the_years_is_refused_before_converting(text: str) -> None:
    with pytest.raises(UnprocessableError, match="a date in the years 1970 to 2999"):
        local_datetime(text, "Pacific/Kiritimati", "entry")


# -- generated input: never a 5xx ----------------------------------------------------------------
DATED_PAGES = [
    "/panel/sessions",
    "/panel/money",
    "/panel/export/sessions.csv",
    "/panel/export/payments.csv",
]


@FUZZ
@given(path=st.sampled_from(DATED_PAGES), since=dates, until=dates)
@example(path="/panel/sessions", since="", until="9999-12-31")
@example(path="/panel/sessions", since="0001-01-01T00:00+05:00", until="")
@example(path="/panel/money", since="", until="9999-12-31")
async def test_panel_date_filters_never_answer_a_server_error(
    client: httpx.AsyncClient, token: str, path: str, since: str, until: str
) -> None:
    no_server_error(await client.get(path, params={"since": since, "until": until}))


@FUZZ
@given(
    path=st.sampled_from(
        [*DATED_PAGES, "/panel/audit", "/panel/accounts", "/panel/tariffs", "/panel/dashboard"]
    ),
    query=st.fixed_dictionaries(
        {},
        optional={
            "lot": filter_text,
            "account": filter_text,
            "state": filter_text,
            "since": dates,
            "until": dates,
            "limit": filter_text,
            "action": filter_text,
            "actor": filter_text,
            "target": filter_text,
            "q": filter_text,
        },
    ),
)
async def test_panel_filters_never_answer_a_server_error(
    client: httpx.AsyncClient, token: str, path: str, query: dict[str, str]
) -> None:
    no_server_error(await client.get(path, params=query))


@FUZZ
@given(
    template=st.sampled_from(
        [
            "/panel/sessions/{0}",
            "/panel/accounts/{0}",
            "/panel/gates/{0}/{1}",
            "/panel/tariffs?lot={0}",
            "/panel/export/sessions.csv?account={0}&lot={1}",
        ]
    ),
    first=ids,
    second=ids,
)
async def test_panel_pages_by_id_never_answer_a_server_error(
    client: httpx.AsyncClient, token: str, template: str, first: str, second: str
) -> None:
    url = template.format(quote(first, safe=""), quote(second, safe=""))
    no_server_error(await client.get(url))


@FUZZ
@given(
    form=st.fixed_dictionaries(
        {},
        optional={
            "grace_minutes": st.one_of(amounts, st.integers().map(str)),
            "increment_minutes": st.one_of(st.sampled_from(["15", "30", "60"]), amounts),
            "increment": amounts,
            "daily_cap": amounts,
            "cap_period": st.one_of(st.sampled_from(["rolling_24h", "calendar_day"]), ids),
            "entry_at": dates,
            "exit_at": dates,
            "effective_from": dates,
            "note": st.text(max_size=40),
        },
    ),
    action=st.sampled_from(["preview", "versions"]),
    lot=st.one_of(st.just("lot1"), ids),
)
@example(form={"increment": "1e10000000"}, action="preview", lot="lot1")
@example(form={"increment": "1e100000"}, action="preview", lot="lot1")
async def test_tariff_forms_never_answer_a_server_error(
    client: httpx.AsyncClient, token: str, form: dict[str, str], action: str, lot: str
) -> None:
    response = await client.post(
        f"/panel/tariffs/{quote(lot, safe='')}/{action}", data={**form, "csrf_token": token}
    )
    no_server_error(response)


@FUZZ
@given(
    form=st.fixed_dictionaries(
        {"pricing": st.sampled_from(["free", "tariff"]), "reason": st.just("fuzzing the form")},
        optional={
            "lots": st.one_of(st.just("lot1"), ids),
            "valid_from": dates,
            "valid_until": dates,
            "hourly": amounts,
            "daily_cap": amounts,
            "grace_minutes": st.one_of(amounts, st.integers().map(str)),
        },
    ),
    account=st.one_of(st.just("alice"), ids),
)
@example(
    form={"pricing": "free", "reason": "extreme", "lots": "lot1", "valid_from": "0001-01-01T00:00"},
    account="alice",
)
async def test_permit_form_never_answers_a_server_error(
    client: httpx.AsyncClient, token: str, form: dict[str, str], account: str
) -> None:
    response = await client.post(
        f"/panel/accounts/{quote(account, safe='')}/permits", data={**form, "csrf_token": token}
    )
    no_server_error(response)


@FUZZ
@given(amount=amounts, session=st.one_of(st.none(), ids), key=st.text(max_size=30))
@example(amount="1e10000000", session=None, key="")
async def test_refund_form_never_answers_a_server_error(
    client: httpx.AsyncClient,
    token: str,
    stay: SessionRead,
    amount: str,
    session: str | None,
    key: str,
) -> None:
    target = stay.session_id if session is None else session
    form = {"amount": amount, "reason": "fuzzing the refund", "key": key, "csrf_token": token}
    response = await client.post(f"/panel/sessions/{quote(target, safe='')}/refund", data=form)
    no_server_error(response)


async def test_the_fuzzed_forms_reach_the_amount_parsing(
    client: httpx.AsyncClient, app: FastAPI, token: str, stay: SessionRead
) -> None:
    """The fuzz targets are real: a good refund and a good tariff version go through."""
    refund: dict[str, Any] = {"amount": "1.00", "reason": "fuzz baseline", "csrf_token": token}
    done = await client.post(f"/panel/sessions/{stay.session_id}/refund", data=refund)
    assert done.status_code == 303
    assert "refunded" in done.cookies.get("qrpark_flash", "")
    version = {
        "increment": "3.00",
        "increment_minutes": "30",
        "grace_minutes": "0",
        "effective_from": "2030-01-01T00:00",
        "note": "fuzz baseline",
        "csrf_token": token,
    }
    created = await client.post("/panel/tariffs/lot1/versions", data=version)
    assert created.status_code == 303
    with app.state.central.db() as db:
        assert len(pricing.list_versions(db, "lot1")) == 2
