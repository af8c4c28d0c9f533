"""The Tariffs page: a lot's tariff versions, a preview calculator and a new version (admin).

Built on ``server.pricing`` (versions are immutable and never retroactive); the panel only
turns form fields into a :class:`~server.pricing.models.TariffSpec` and audits the change.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, StringConstraints, ValidationError
from sqlmodel import Session

from server.audit import service as audit
from server.auth.web import AdminWriter, Operator, ViewerDep, ViewerWriter
from server.deps import NowDep, SessionDep
from server.errors import UnprocessableError
from server.lots import service as lots
from server.lots.models import Lot
from server.panel.amounts import local_datetime, to_major, to_minor
from server.panel.router import back, page
from server.panel.templating import when
from server.pricing import service as pricing
from server.pricing.engine import CapPeriod, Quote, price
from server.pricing.models import TariffSpec

__all__ = ["router"]

router = APIRouter(prefix="/panel/tariffs", tags=["panel"], include_in_schema=False)

MAX_PREVIEW = timedelta(days=366)


Text = Annotated[str, StringConstraints(max_length=100)]


class TariffForm(BaseModel):
    """What the form holds, as text, so a refused form comes back as it was typed."""

    grace_minutes: Text = "15"
    increment_minutes: Text = "60"
    increment: Text = "5.00"
    daily_cap: Text = ""
    cap_period: Text = CapPeriod.ROLLING_24H.value
    effective_from: Text = ""
    note: Annotated[str, StringConstraints(max_length=500)] = ""
    entry_at: Text = ""
    exit_at: Text = ""


def _spec(form: TariffForm, lot: Lot) -> TariffSpec:
    try:
        return TariffSpec(
            currency=lot.currency,
            grace_minutes=int(form.grace_minutes),
            increment_minutes=int(form.increment_minutes),
            increment_minor=to_minor(form.increment, lot.currency, "rate"),
            daily_cap_minor=to_minor(form.daily_cap, lot.currency, "daily cap")
            if form.daily_cap.strip()
            else None,
            cap_period=CapPeriod(form.cap_period),
        )
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, UnprocessableError):
            raise
        raise UnprocessableError(f"the tariff is not valid: {exc}") from None


def _form_from(spec: TariffSpec, now: datetime, zone: str) -> TariffForm:
    local = now.astimezone(ZoneInfo(zone)).replace(second=0, microsecond=0, tzinfo=None)
    return TariffForm(
        grace_minutes=str(spec.grace_minutes),
        increment_minutes=str(spec.increment_minutes),
        increment=to_major(spec.increment_minor, spec.currency),
        daily_cap=to_major(spec.daily_cap_minor, spec.currency),
        cap_period=spec.cap_period.value,
        effective_from=(local + timedelta(days=1)).replace(hour=0, minute=0).isoformat(),
        entry_at=local.replace(hour=9, minute=0).isoformat(),
        exit_at=local.replace(hour=11, minute=30).isoformat(),
    )


def _view(
    request: Request,
    db: Session,
    operator: Operator,
    lot: Lot,
    now: datetime,
    *,
    form: TariffForm | None = None,
    quote_result: Quote | None = None,
    error: str | None = None,
) -> HTMLResponse:
    versions = [pricing.version_read(v) for v in pricing.list_versions(db, lot.lot_id)]
    current = None
    if versions:
        current = pricing.version_at(db, lot.lot_id, now).version
    if form is None:
        base = versions[-1].tariff if versions else TariffSpec(currency=lot.currency)
        form = _form_from(base, now, lot.timezone)
    return page(
        request,
        "tariffs.html",
        operator,
        lots=lots.list_lots(db),
        lot=lot,
        versions=list(reversed(versions)),
        current=current,
        form=form,
        quote=quote_result,
        error=error,
        cap_periods=[p.value for p in CapPeriod],
        now=now,
    )


@router.get("", response_class=HTMLResponse)
def tariffs_page(
    request: Request, operator: ViewerDep, db: SessionDep, now: NowDep, lot: str = ""
) -> Response:
    all_lots = lots.list_lots(db)
    if not all_lots:
        return page(request, "tariffs.html", operator, lots=[], lot=None)
    chosen = next((item for item in all_lots if item.lot_id == lot), all_lots[0])
    return _view(request, db, operator, chosen, now)


@router.post("/{lot_id}/preview", response_class=HTMLResponse)
def preview(
    request: Request,
    lot_id: str,
    *,
    operator: ViewerWriter,
    db: SessionDep,
    now: NowDep,
    form: Annotated[TariffForm, Form()],
) -> Response:
    """Price a stay with the draft tariff on the form (nothing is stored)."""
    lot = lots.require_lot(db, lot_id)
    try:
        spec = _spec(form, lot)
        entry = local_datetime(form.entry_at, lot.timezone, "entry")
        exit_ = local_datetime(form.exit_at, lot.timezone, "exit")
        if exit_ - entry > MAX_PREVIEW:
            raise UnprocessableError("preview stays of at most 366 days")
        result = price(spec.tariff(lot.timezone), entry, exit_)
    except UnprocessableError as exc:
        return _view(request, db, operator, lot, now, form=form, error=exc.detail)
    return _view(request, db, operator, lot, now, form=form, quote_result=result)


@router.post("/{lot_id}/versions")
def create_version(
    request: Request,
    lot_id: str,
    *,
    operator: AdminWriter,
    db: SessionDep,
    now: NowDep,
    form: Annotated[TariffForm, Form()],
) -> Response:
    """A new version from ``effective_from`` (admin only; audited; never retroactive)."""
    lot = lots.require_lot(db, lot_id)
    try:
        if len(form.note.strip()) < 3:
            raise UnprocessableError("say why the tariff changes (note, at least 3 characters)")
        spec = _spec(form, lot)
        starts = local_datetime(form.effective_from, lot.timezone, "effective from")
        version = pricing.add_version(
            db,
            lot_id=lot.lot_id,
            currency=lot.currency,
            tariff=spec,
            effective_from=starts,
            now=now,
            note=form.note.strip(),
        )
    except UnprocessableError as exc:
        return _view(request, db, operator, lot, now, form=form, error=exc.detail)
    details: dict[str, Any] = {
        "version": version.version,
        "effective_from": starts.isoformat(),
        "tariff": spec.model_dump(mode="json", exclude_defaults=True),
    }
    audit.record(
        db,
        actor=operator.actor,
        action="tariff.create_version",
        target_type="lot",
        target_id=lot.lot_id,
        now=now,
        reason=form.note.strip(),
        details=details,
    )
    db.commit()
    return back(
        request,
        f"/panel/tariffs?lot={quote(lot.lot_id)}",
        ok=True,
        text=f"Version {version.version} of {lot.name} takes effect {when(starts, lot.timezone)}",
    )
