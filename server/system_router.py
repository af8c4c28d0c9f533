"""Health, readiness and the public verification keys gateways are configured with."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlmodel import select

from parking_protocol.qr_token import public_key_text
from server.deps import CentralDep, SessionDep

__all__ = ["router"]

router = APIRouter()


class PublicKeyRead(BaseModel):
    kid: str
    public_key: str
    active: bool


class KeysRead(BaseModel):
    keys: list[PublicKeyRead]


@router.get("/health", tags=["system"])
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", tags=["system"], response_model=None)
def ready(db: SessionDep, central: CentralDep) -> JSONResponse:
    try:
        db.exec(select(sa.literal(1))).one()
    except sa.exc.SQLAlchemyError:
        return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)
    mqtt = "disabled"
    if central.transport is not None:
        mqtt = "connected" if central.transport.connected else "disconnected"
    return JSONResponse({"status": "ready", "database": "ok", "mqtt": mqtt})


@router.get("/api/v1/keys", tags=["keys"])
def keys(central: CentralDep) -> KeysRead:
    return KeysRead(
        keys=[
            PublicKeyRead(
                kid=key.kid,
                public_key=public_key_text(key.public_key),
                active=key.kid == central.keys.active.kid,
            )
            for key in central.keys.all
        ]
    )
