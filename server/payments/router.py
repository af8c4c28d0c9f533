"""HTTP for payment methods, paying a stay, validations, permits, refunds and receipts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, status
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.exc import IntegrityError

from parking_protocol.types import Money
from server.accounts import service as accounts
from server.auth.api import ApiOperator, ApiViewer
from server.deps import CentralDep, NowDep, SessionDep
from server.errors import ConflictError
from server.idempotency import KEY_RESPONSES, in_flight
from server.lots import service as lots
from server.payments import receipts, service
from server.payments.busy import busy_means_retry
from server.payments.models import (
    CardSet,
    PaymentMethodRead,
    PermitCreate,
    PermitRead,
    ReceiptRead,
    RefundCreate,
    RefundRead,
    SessionPayCreate,
    SessionPayRead,
    StayQuoteRead,
    ValidationCreate,
    ValidationRead,
)
from server.pricing.models import LineItemRead
from server.sessions import service as sessions

__all__ = ["router"]

router = APIRouter(tags=["payments"])

IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Any unique string; retrying with the same key has the effect once.",
    ),
]
Model = TypeVar("Model", bound=BaseModel)


def _once(
    db: SessionDep,
    now: NowDep,
    *,
    scope: str,
    key: str,
    body: object,
    model: type[Model],
    run: Callable[[], Model],
) -> tuple[Model, bool]:
    """Run once per key and commit; a racing duplicate gets the winner's stored answer."""
    result = service.idempotent(db, scope=scope, key=key, body=body, model=model, run=run, now=now)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        return service.idempotent(
            db, scope=scope, key=key, body=body, model=model, run=run, now=now
        )
    return result


def _commit(db: SessionDep) -> None:
    """Commit; the same key racing in from another request loses on the primary key."""
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise ConflictError("a request with this Idempotency-Key is in flight: retry") from None


def _created(model: BaseModel, replayed: bool) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(
        model.model_dump(mode="json"), status_code=status.HTTP_201_CREATED, headers=headers
    )


@router.put("/api/v1/accounts/{account_id}/payment-method")
def set_payment_method(
    account_id: str, data: CardSet, operator: ApiOperator, db: SessionDep
) -> PaymentMethodRead:
    """Pay exits from the wallet or by card (sandbox tokens: see the schema)."""
    account = accounts.require_account(db, account_id)
    account.payment_method = data.method
    account.card_token = data.card_token if data.method == "card" else None
    token = data.card_token or ""
    account.card_label = f"Card ending {token[-4:]}" if data.method == "card" else None
    db.add(account)
    db.commit()
    return PaymentMethodRead(
        account_id=account_id, method=account.payment_method, card_label=account.card_label
    )


@router.post("/api/v1/permits", status_code=status.HTTP_201_CREATED)
def create_permit(
    data: PermitCreate, operator: ApiOperator, db: SessionDep, now: NowDep
) -> PermitRead:
    permit = service.create_permit(db, data, now=now)
    db.commit()
    return service.permit_read(permit)


@router.get("/api/v1/accounts/{account_id}/permits")
def list_permits(account_id: str, viewer: ApiViewer, db: SessionDep) -> list[PermitRead]:
    accounts.require_account(db, account_id)
    return [service.permit_read(p) for p in service.list_permits(db, account_id)]


@router.post(
    "/api/v1/sessions/{session_id}/validations",
    status_code=status.HTTP_201_CREATED,
    response_model=ValidationRead,
    responses=KEY_RESPONSES,
)
def add_validation(
    session_id: str,
    data: ValidationCreate,
    *,
    key: IdempotencyKey,
    operator: ApiOperator,
    db: SessionDep,
    now: NowDep,
    central: CentralDep,
) -> JSONResponse:
    scope = f"validation:{session_id}"
    with in_flight(central.engine, db, scope=scope, key=key, now=now):
        parking = sessions.require_session(db, session_id)
        result, replayed = _once(
            db,
            now,
            scope=scope,
            key=key,
            body=data.model_dump(mode="json"),
            model=ValidationRead,
            run=lambda: service.add_validation(db, parking, data, now=now),
        )
    return _created(result, replayed)


@router.get("/api/v1/sessions/{session_id}/quote")
def quote_open_session(
    session_id: str, viewer: ApiViewer, db: SessionDep, now: NowDep
) -> StayQuoteRead:
    """What the stay would cost if it ended now (permits, validations, prepayment applied)."""
    parking = sessions.require_session(db, session_id)
    lot = lots.require_lot(db, parking.lot_id)
    at = parking.exited_at or now
    stay, version = service.stay_price(db, lot, parking, at, for_update=False)
    amount = stay.quote.amount
    return StayQuoteRead(
        session_id=session_id,
        tariff_version=version.version,
        at=at,
        amount=amount,
        due=Money(amount_minor=stay.due_minor, currency=amount.currency),
        line_items=[
            LineItemRead(
                description=i.description, quantity=i.quantity, amount_minor=i.amount_minor
            )
            for i in stay.quote.line_items
        ],
    )


@router.post(
    "/api/v1/sessions/{session_id}/payments",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionPayRead,
    responses={
        **KEY_RESPONSES,
        402: {"description": "Declined: top up or change the card"},
        503: {
            "description": "The provider did not confirm, or the database was busy: retry "
            "with the same key"
        },
    },
)
def pay_session(
    session_id: str,
    data: SessionPayCreate,
    *,
    key: IdempotencyKey,
    operator: ApiOperator,
    db: SessionDep,
    now: NowDep,
    central: CentralDep,
) -> JSONResponse:
    """Pay an open stay before driving to the exit (then the exit opens within the grace)."""
    scope = f"session-pay:{session_id}"
    with busy_means_retry(db), in_flight(central.engine, db, scope=scope, key=key, now=now):
        parking = sessions.require_session(db, session_id)
        lot = lots.require_lot(db, parking.lot_id)
        account = accounts.require_account(db, parking.account_id)
        replayed = service.already_done(db, scope, key)
        try:
            result = service.pay_open_session(
                db,
                central.flow_config.payments,
                lot=lot,
                parking=parking,
                account=account,
                method=data.method,
                key=key,
                now=now,
            )
        except (service.PaymentRequired, service.PaymentUnavailable) as refused:
            if refused.booked_minor:
                _commit(db)  # what the card took counts toward the stay, refused or not
            raise
        _commit(db)
    return _created(result, replayed)


@router.post(
    "/api/v1/sessions/{session_id}/refunds",
    status_code=status.HTTP_201_CREATED,
    response_model=list[RefundRead],
    responses={
        **KEY_RESPONSES,
        409: {"description": "Nothing left to refund"},
        503: {
            "description": "The provider did not confirm, or the database was busy: retry "
            "with the same key"
        },
    },
)
def refund_session(
    session_id: str,
    data: RefundCreate,
    *,
    key: IdempotencyKey,
    operator: ApiOperator,
    db: SessionDep,
    now: NowDep,
    central: CentralDep,
) -> JSONResponse:
    """An operator's full or partial refund, with a reason; recorded in the audit log under
    the caller's identity (a client-sent ``actor`` is replaced)."""
    data = data.model_copy(update={"actor": operator.actor[:100]})
    scope = f"refund:{session_id}"
    with busy_means_retry(db), in_flight(central.engine, db, scope=scope, key=key, now=now):
        parking = sessions.require_session(db, session_id)
        refunds, replayed = service.refund_session(
            db, central.flow_config.payments, parking=parking, data=data, key=key, now=now
        )
        _commit(db)
    body = TypeAdapter(list[RefundRead]).dump_python(refunds, mode="json")
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(body, status_code=status.HTTP_201_CREATED, headers=headers)


@router.get("/api/v1/sessions/{session_id}/receipt")
def get_receipt(session_id: str, viewer: ApiViewer, db: SessionDep) -> ReceiptRead:
    return receipts.receipt(db, sessions.require_session(db, session_id))


@router.get("/receipts/{session_id}", response_class=HTMLResponse)
def receipt_page(session_id: str, db: SessionDep) -> HTMLResponse:
    """The printable receipt."""
    data = receipts.receipt(db, sessions.require_session(db, session_id))
    return HTMLResponse(receipts.render_receipt(data))
