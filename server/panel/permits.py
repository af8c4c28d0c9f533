"""Granting a permit from an account's page: lots, a validity window, free or a permit tariff.

The permit itself is :func:`server.payments.service.create_permit`; the panel turns the form
into a :class:`~server.payments.models.PermitCreate` and writes the audit entry (who, why).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from pydantic import ValidationError

from server.accounts import service as accounts
from server.audit import service as audit
from server.auth.web import OperatorWriter
from server.deps import NowDep, SessionDep
from server.errors import UnprocessableError
from server.lots import service as lots
from server.panel.actions import clean_reason
from server.panel.amounts import local_datetime, to_minor
from server.panel.router import back
from server.panel.service import panel_zone
from server.panel.templating import when
from server.payments import service as payments
from server.payments.models import PermitCreate
from server.pricing.models import TariffSchema

__all__ = ["router"]

router = APIRouter(prefix="/panel/accounts", tags=["panel"], include_in_schema=False)

Short = Annotated[str, Form(max_length=40)]


@router.post("/{account_id}/permits")
def grant_permit(
    request: Request,
    account_id: str,
    *,
    operator: OperatorWriter,
    db: SessionDep,
    now: NowDep,
    lot_ids: Annotated[list[str], Form(alias="lots")] = [],  # noqa: B006 - FastAPI copies it
    valid_from: Short = "",
    valid_until: Short = "",
    pricing: Annotated[Literal["free", "tariff"], Form()] = "free",
    hourly: Short = "",
    daily_cap: Short = "",
    grace_minutes: Short = "0",
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Audited as ``permit.grant`` with the window, the lots and the tariff."""
    url = f"/panel/accounts/{quote(account_id)}"
    account = accounts.require_account(db, account_id)
    try:
        note = clean_reason(reason)
        known = {item.lot_id: item for item in lots.list_lots(db)}
        chosen = sorted(set(lot_ids))
        if not chosen:
            raise UnprocessableError("choose at least one lot")
        unknown = [lot_id for lot_id in chosen if lot_id not in known]
        if unknown:
            raise UnprocessableError(f"no such lot: {', '.join(unknown)}")
        zone = panel_zone(list(known.values()))  # the zone the form shows
        starts = local_datetime(valid_from, zone, "valid from")
        ends = local_datetime(valid_until, zone, "valid until")
        tariff = None
        if pricing == "tariff":
            try:
                grace = int(grace_minutes or "0")
            except ValueError:
                raise UnprocessableError("grace: whole minutes") from None
            tariff = TariffSchema(
                grace_minutes=grace,
                hourly_minor=to_minor(hourly, account.currency, "hourly rate"),
                daily_cap_minor=to_minor(daily_cap, account.currency, "daily cap")
                if daily_cap.strip()
                else None,
                currency=account.currency,
            )
        data = PermitCreate(
            account_id=account_id,
            lot_ids=chosen,
            valid_from=starts,
            valid_until=ends,
            tariff=tariff,
            note=note,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        return back(request, url, ok=False, text=f"No permit: {error['msg']}")
    except UnprocessableError as exc:
        return back(request, url, ok=False, text=f"No permit: {exc.detail}")
    permit = payments.create_permit(db, data, now=now)
    details: dict[str, Any] = {
        "permit_id": permit.permit_id,
        "lots": chosen,
        "valid_from": starts.isoformat(),
        "valid_until": ends.isoformat(),
        "tariff": None if tariff is None else tariff.model_dump(mode="json"),
    }
    audit.record(
        db,
        actor=operator.actor,
        action="permit.grant",
        target_type="account",
        target_id=account_id,
        now=now,
        reason=note,
        details=details,
    )
    db.commit()
    kind = "free parking" if tariff is None else "the permit tariff"
    return back(
        request,
        url,
        ok=True,
        text=f"Permit for {', '.join(known[i].name for i in chosen)} ({kind}) "
        f"until {when(ends, zone)}",
    )
