"""HTTP for accounts, top-ups and the driver's dynamic code (JSON and SVG)."""

from __future__ import annotations

import io
from typing import Annotated

import qrcode
import qrcode.constants
import qrcode.image.svg
from fastapi import APIRouter, Header, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from server.accounts import service
from server.accounts.models import AccountCreate, AccountRead, CodeRead, TopupCreate, TopupRead
from server.deps import CentralDep, NowDep, SessionDep

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


@router.post("", status_code=status.HTTP_201_CREATED)
def create_account(data: AccountCreate, db: SessionDep, now: NowDep) -> AccountRead:
    account = service.create_account(db, data, now=now)
    db.commit()
    return service.account_read(db, account)


@router.get("/{account_id}")
def get_account(account_id: str, db: SessionDep) -> AccountRead:
    return service.account_read(db, service.require_account(db, account_id))


@router.post(
    "/{account_id}/topups",
    status_code=status.HTTP_201_CREATED,
    response_model=TopupRead,
    responses={422: {"description": "Invalid body, or the key was used with another body"}},
)
def create_topup(
    account_id: str,
    data: TopupCreate,
    idempotency_key: IdempotencyKey,
    db: SessionDep,
    now: NowDep,
) -> JSONResponse:
    outcome = service.topup(
        db, account_id, data.amount_minor, idempotency_key=idempotency_key, now=now
    )
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return JSONResponse(
        outcome.response.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED,
        headers=headers,
    )


@router.post("/{account_id}/codes", status_code=status.HTTP_201_CREATED)
def create_code(account_id: str, central: CentralDep) -> CodeRead:
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
    responses={200: {"content": {"image/svg+xml": {}}}},
)
async def code_svg(account_id: str, central: CentralDep) -> Response:
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
