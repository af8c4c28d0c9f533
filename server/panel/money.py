"""The Money page (revenue charts, payments, refunds, debts), refunds and CSV exports.

Figures come from the ledger (see :mod:`server.panel.queries`); a refund goes through
:func:`server.payments.service.refund_session`, which posts it and writes the audit log
under the signed-in operator. Viewers see everything and change nothing.
"""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from server.audit import service as audit
from server.auth.models import Role
from server.auth.web import Operator, OperatorWriter, ViewerDep
from server.deps import CentralDep, NowDep, SessionDep
from server.errors import DomainError, UnprocessableError
from server.idempotency import in_flight
from server.lots import service as lots
from server.panel import charts, queries
from server.panel import service as panel_service
from server.panel.actions import clean_reason
from server.panel.amounts import check_year, to_major, to_minor
from server.panel.router import back, page, parse_day
from server.panel.templating import money, short_id
from server.payments import service as payments
from server.payments.models import RefundCreate
from server.sessions import service as sessions

__all__ = ["csv_bytes", "router", "window"]

router = APIRouter(prefix="/panel", tags=["panel"], include_in_schema=False)

DEFAULT_DAYS = 14
MAX_DAYS = 366
EXPORT_LIMIT = 100_000
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


# -- helpers -------------------------------------------------------------------------------------
def window(
    since: str | None, until: str | None, *, today: date, zone: str
) -> tuple[date, date, datetime, datetime]:
    """The days [since, until] (default: the last 14 days) and their UTC bounds [start, end)."""
    try:
        last = date.fromisoformat(until) if until else today
        check_year(last, "to")  # before any arithmetic: 9999-12-31 + 1 day overflows
        if since:
            first = date.fromisoformat(since)
            check_year(first, "from")
        else:
            first = last - timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        raise UnprocessableError("dates are YYYY-MM-DD") from None
    if first > last:
        first, last = last, first
    if (last - first).days + 1 > MAX_DAYS:
        raise UnprocessableError(f"show at most {MAX_DAYS} days at once")
    tz = ZoneInfo(zone)
    start = datetime.combine(first, time(), tz).astimezone(UTC)
    end = datetime.combine(last + timedelta(days=1), time(), tz).astimezone(UTC)
    return first, last, start, end


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _return_to(value: str, default: str) -> str:
    if value.startswith("/panel/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def _cell(value: object) -> str:
    """One CSV cell: text that a spreadsheet would run as a formula is prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA):
        return "'" + text
    return text


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """RFC 4180 CSV (quotes doubled, CRLF) in UTF-8 with a BOM so spreadsheets read it as such."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(value) for value in row])
    return ("\ufeff" + buffer.getvalue()).encode()


def _csv_response(filename: str, body: bytes) -> Response:
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _audit_export(
    db: Session, operator: Operator, what: str, *, filters: dict[str, str], rows: int, now: datetime
) -> None:
    audit.record(
        db,
        actor=operator.actor,
        action=f"export.{what}",
        target_type="export",
        target_id=what,
        now=now,
        details={**{k: v for k, v in filters.items() if v}, "rows": rows},
    )
    db.commit()


# -- the page ------------------------------------------------------------------------------------
def _charts(
    revenue: queries.Revenue, days: list[date], names: dict[str, str]
) -> list[dict[str, Any]]:
    """A lot chart and a day chart per currency (there is usually one)."""
    out = []
    for currency in revenue.currencies():
        lots_money = revenue.in_currency(currency)

        def label(minor: int, currency: str = currency) -> str:
            return money(minor, currency)

        by_lot = charts.rows(
            [(names.get(m.lot_id, m.lot_id), m.net_minor) for m in lots_money], label=label
        )
        by_day = charts.columns(
            [d.strftime("%m-%d") for d in days],
            [
                charts.Series(names.get(m.lot_id, m.lot_id), tuple(m.days.get(d, 0) for d in days))
                for m in lots_money
            ],
            label=label,
            unit=10 ** (2 if currency not in ("JPY", "KRW") else 0),
        )
        out.append({"currency": currency, "by_lot": by_lot, "by_day": by_day})
    return out


@router.get("/money", response_class=HTMLResponse)
def money_page(
    request: Request,
    *,
    operator: ViewerDep,
    db: SessionDep,
    now: NowDep,
    lot: str = "",
    since: str = "",
    until: str = "",
) -> HTMLResponse:
    all_lots = lots.list_lots(db)
    zone = panel_service.panel_zone(all_lots)
    today = now.astimezone(ZoneInfo(zone)).date()
    refusal = None
    try:
        first, last, start, end = window(since or None, until or None, today=today, zone=zone)
    except UnprocessableError as exc:
        refusal = f"{exc.detail}; showing the last {DEFAULT_DAYS} days"
        first, last, start, end = window(None, None, today=today, zone=zone)
    names = {item.lot_id: item.name for item in all_lots}
    zones = {item.lot_id: item.timezone for item in all_lots}
    lot_id = lot if lot in names else None
    revenue = queries.revenue(db, since=start, until=end, zones=zones, lot_id=lot_id)
    found = queries.payments_between(db, since=start, until=end, lot_id=lot_id)
    refunded = payments.refunded_minor(db, [p.payment_id for p in found])
    refundable = queries.refundable_by_session(db, [p.session_id or "" for p in found])
    debts = queries.outstanding_debts(db, lot_id=lot_id)
    owed: dict[str, int] = {}
    for debt in debts:
        owed[debt.currency] = owed.get(debt.currency, 0) + debt.amount_minor
    can_refund = operator.can(Role.OPERATOR)
    filters = {"lot": lot_id or "", "since": first.isoformat(), "until": last.isoformat()}
    return page(
        request,
        "money.html",
        operator,
        status_code=422 if refusal else 200,
        refusal=refusal,
        lots=all_lots,
        names=names,
        zones=zones,
        zone=zone,
        filters=filters,
        days=(last - first).days + 1,
        revenue=revenue,
        charts=_charts(revenue, _days(first, last), names),
        payments=found,
        refunded=refunded,
        refundable=refundable,
        refunds=queries.refunds_between(db, since=start, until=end, lot_id=lot_id),
        debts=debts,
        owed=owed,
        can_refund=can_refund,
        refund_key=lambda: secrets.token_urlsafe(18) if can_refund else "",
        to_major=to_major,
        export_query=_query(
            {"lot": lot_id or "", "since": first.isoformat(), "until": last.isoformat()}
        ),
    )


def _query(values: dict[str, str]) -> str:
    return "&".join(f"{k}={quote(v)}" for k, v in values.items() if v)


# -- refunds -------------------------------------------------------------------------------------
@router.post("/sessions/{session_id}/refund")
def refund(
    request: Request,
    session_id: str,
    *,
    operator: OperatorWriter,
    db: SessionDep,
    now: NowDep,
    central: CentralDep,
    reason: Annotated[str, Form(max_length=500)] = "",
    amount: Annotated[str, Form(max_length=32)] = "",
    key: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """A full (no amount) or partial refund with a reason, once per form (its hidden key)."""
    url = _return_to(next, f"/panel/sessions/{quote(session_id)}")
    parking = sessions.require_session(db, session_id)
    currency = parking.currency
    try:
        text = clean_reason(reason)
        wanted = to_minor(amount, currency, "amount") if amount.strip() else None
        if wanted == 0:
            raise UnprocessableError("amount: more than zero, or leave it empty for all")
        data = RefundCreate(amount_minor=wanted, reason=text, actor=operator.actor[:100])
        token = f"panel:{key or secrets.token_urlsafe(18)}"
        with in_flight(central.engine, db, scope=f"refund:{session_id}", key=token, now=now):
            parking = sessions.require_session(db, session_id)
            done, replayed = payments.refund_session(
                db, central.flow_config.payments, parking=parking, data=data, key=token, now=now
            )
            db.commit()
    except ValidationError as exc:
        return back(request, url, ok=False, text=f"Not refunded: {exc.errors()[0]['msg']}")
    except DomainError as exc:
        return back(request, url, ok=False, text=f"Not refunded: {exc.detail}")
    total = sum(item.amount.amount_minor for item in done)
    verb = "was already refunded" if replayed else "refunded"
    return back(
        request,
        url,
        ok=True,
        text=f"{money(total, currency)} {verb} on session {short_id(session_id)}",
    )


# -- CSV exports ---------------------------------------------------------------------------------
PAYMENT_COLUMNS = (
    "payment_id",
    "created_at",
    "lot_id",
    "account_id",
    "session_id",
    "method",
    "status",
    "currency",
    "amount_minor",
    "amount",
    "refunded_minor",
    "collects_payment_id",
)

SESSION_COLUMNS = (
    "session_id",
    "account_id",
    "lot_id",
    "state",
    "entered_at",
    "exited_at",
    "duration_s",
    "entry_gate_id",
    "exit_gate_id",
    "tariff_version",
    "currency",
    "amount_minor",
    "amount",
    "settlement",
    "payment_method",
    "offline_entry",
    "offline_exit",
)


@router.get("/export/payments.csv")
def export_payments(
    *,
    operator: ViewerDep,
    db: SessionDep,
    now: NowDep,
    lot: str = "",
    since: str = "",
    until: str = "",
) -> Response:
    """The payments of the Money page's filters (lot, days), every row, as CSV."""
    all_lots = lots.list_lots(db)
    zone = panel_service.panel_zone(all_lots)
    first, last, start, end = window(
        since or None, until or None, today=now.astimezone(ZoneInfo(zone)).date(), zone=zone
    )
    lot_id = lot or None
    found = queries.payments_between(db, since=start, until=end, lot_id=lot_id, limit=EXPORT_LIMIT)
    refunded = payments.refunded_minor(db, [p.payment_id for p in found])
    body = csv_bytes(
        PAYMENT_COLUMNS,
        (
            (
                p.payment_id,
                p.created_at,
                p.lot_id,
                p.account_id,
                p.session_id,
                p.method,
                p.status,
                p.currency,
                p.amount_minor,
                to_major(p.amount_minor, p.currency),
                refunded.get(p.payment_id, 0),
                p.collects_payment_id,
            )
            for p in found
        ),
    )
    filters = {"lot": lot, "since": first.isoformat(), "until": last.isoformat()}
    _audit_export(db, operator, "payments", filters=filters, rows=len(found), now=now)
    return _csv_response(f"qrpark-payments-{first}-{last}.csv", body)


@router.get("/export/sessions.csv")
def export_sessions(
    *,
    operator: ViewerDep,
    db: SessionDep,
    now: NowDep,
    lot: str = "",
    account: str = "",
    state: Literal["", "open", "closed"] = "",
    since: str = "",
    until: str = "",
    limit: Annotated[int, Query(ge=1, le=EXPORT_LIMIT)] = EXPORT_LIMIT,
) -> Response:
    """The sessions of the Sessions page's filters, as CSV."""
    found = panel_service.search_sessions(
        db,
        lot_id=lot or None,
        account_id=account.strip() or None,
        state=state or None,
        since=parse_day(since, what="since"),
        until=parse_day(until, end=True, what="until"),
        limit=limit,
    )
    body = csv_bytes(
        SESSION_COLUMNS,
        (
            (
                s.session_id,
                s.account_id,
                s.lot_id,
                s.state,
                s.entered_at,
                s.exited_at,
                None if s.exited_at is None else int((s.exited_at - s.entered_at).total_seconds()),
                s.entry_gate_id,
                s.exit_gate_id,
                s.tariff_version,
                s.currency,
                s.amount_minor,
                to_major(s.amount_minor, s.currency),
                s.settlement,
                s.payment_method,
                s.offline_entry,
                s.offline_exit,
            )
            for s in found
        ),
    )
    filters = {"lot": lot, "account": account, "state": state, "since": since, "until": until}
    _audit_export(db, operator, "sessions", filters=filters, rows=len(found), now=now)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    return _csv_response(f"qrpark-sessions-{stamp}.csv", body)
