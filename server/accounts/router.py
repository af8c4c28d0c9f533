"""HTTP for accounts, top-ups, blocking and the driver's dynamic code (JSON and SVG)."""

from __future__ import annotations

import io
from typing import Annotated

import qrcode
import qrcode.constants
import qrcode.image.svg
from fastapi import APIRouter, Header, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server.accounts import service
from server.accounts.models import AccountCreate, AccountRead, CodeRead, TopupCreate, TopupRead
from server.audit import service as audit
from server.auth.api import AccountReader, ApiOperator, CodeIssuer
from server.deps import CentralDep, NowDep, SessionDep
from server.idempotency import KEY_RESPONSES, in_flight
from server.panel import actions
from server.panel.deps import PanelDep
from server.payments.busy import busy_means_retry

__all__ = ["router", "svg_qr"]

router = APIRouter(prefix="/api/v1/accounts", tags=["accounts"])

IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Any unique string; retrying with the same key credits once.",
    ),
]


class AccountBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocked: bool
    reason: Annotated[str, Field(min_length=3, max_length=300)]


class AccountBlockRead(BaseModel):
    account_id: str
    blocked: bool
    detail: str


@router.post("", status_code=status.HTTP_201_CREATED)
def create_account(
    data: AccountCreate, operator: ApiOperator, db: SessionDep, now: NowDep
) -> AccountRead:
    account = service.create_account(db, data, now=now)
    db.commit()
    return service.account_read(db, account)


@router.get("/{account_id}")
def get_account(account_id: str, caller: AccountReader, db: SessionDep) -> AccountRead:
    return service.account_read(db, service.require_account(db, account_id))


@router.post(
    "/{account_id}/topups",
    status_code=status.HTTP_201_CREATED,
    response_model=TopupRead,
    responses={
        **KEY_RESPONSES,
        201: {
            "links": {  # OpenAPI link: what a client (and schemathesis) does next
                "GetAccount": {
                    "operationId": "get_account_api_v1_accounts__account_id__get",
                    "parameters": {"account_id": "$request.path.account_id"},
                    "description": "The account with its new balance",
                }
            }
        },
        503: {"description": "The database was busy: retry with the same key"},
    },
)
def create_topup(
    account_id: str,
    data: TopupCreate,
    *,
    idempotency_key: IdempotencyKey,
    operator: ApiOperator,
    db: SessionDep,
    central: CentralDep,
    now: NowDep,
) -> JSONResponse:
    scope = f"topup:{account_id}"
    key = idempotency_key
    with busy_means_retry(db), in_flight(central.engine, db, scope=scope, key=key, now=now):
        outcome = service.topup(
            db, account_id, data.amount_minor, idempotency_key=idempotency_key, now=now
        )
        if not outcome.replayed:
            audit.record(
                db,
                actor=operator.actor,
                action="account.topup",
                target_type="account",
                target_id=account_id,
                now=now,
                details={"amount_minor": data.amount_minor, "key": idempotency_key[:64]},
            )
            db.commit()
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return JSONResponse(
        outcome.response.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED,
        headers=headers,
    )


@router.post(
    "/{account_id}/block",
    responses={404: {"description": "No such account"}},
)
async def block_account(
    account_id: str, data: AccountBlock, operator: ApiOperator, db: SessionDep, panel: PanelDep
) -> AccountBlockRead:
    """Block (or unblock) an account: its codes are refused, every lot's deny list is
    republished; audited."""
    outcome = await actions.block_account(
        panel, db, operator, account_id, blocked=data.blocked, reason=data.reason
    )
    return AccountBlockRead(account_id=account_id, blocked=data.blocked, detail=outcome.detail)


@router.post(
    "/{account_id}/codes",
    status_code=status.HTTP_201_CREATED,
    responses={429: {"description": "Too many codes for this account: see Retry-After"}},
)
def create_code(account_id: str, caller: CodeIssuer, central: CentralDep) -> CodeRead:
    return central.issue_code(account_id)


def svg_qr(text: str) -> bytes:
    """``text`` as an SVG QR code (error correction M, a quiet zone of 4 modules)."""
    image = qrcode.make(
        text,
        image_factory=qrcode.image.svg.SvgPathImage,
        error_correction=qrcode.constants.ERROR_CORRECT_M,
        border=4,
    )
    buffer = io.BytesIO()
    image.save(buffer)
    return buffer.getvalue()


@router.get(
    "/{account_id}/code.svg",
    response_class=Response,
    responses={
        200: {"content": {"image/svg+xml": {}}},
        429: {"description": "Too many codes for this account: see Retry-After"},
    },
)
async def code_svg(account_id: str, caller: CodeIssuer, central: CentralDep) -> Response:
    issued = await run_in_threadpool(central.issue_code, account_id)
    svg = await run_in_threadpool(svg_qr, issued.code)
    lifetime = int((issued.expires_at - issued.issued_at).total_seconds())
    return Response(
        svg,
        media_type="image/svg+xml",
        headers={
            "Cache-Control": "no-store",
            "X-Code-Kid": issued.kid,
            "X-Code-Expires-At": issued.expires_at.isoformat(),
            "X-Code-Lifetime": str(lifetime),
        },
    )
