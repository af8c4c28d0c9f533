"""HTTP for API tokens (admin only): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field

from server.audit import service as audit
from server.auth import tokens
from server.auth.api import ApiAdmin
from server.auth.models import ApiToken, Role
from server.deps import NowDep, SessionDep

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@ -]+$")]
    role: Role


class TokenRead(BaseModel):
    token_id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="The secret: shown only now, store it safely")


def _read(record: ApiToken) -> TokenRead:
    return TokenRead(
        token_id=record.token_id,
        name=record.name,
        role=Role(record.role),
        created_at=record.created_at,
        created_by=record.created_by,
        revoked_at=record.revoked_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(data: TokenCreate, admin: ApiAdmin, db: SessionDep, now: NowDep) -> TokenCreated:
    record, secret = tokens.create_token(
        db, name=data.name, role=data.role, created_by=admin.actor, now=now
    )
    audit.record(
        db,
        actor=admin.actor,
        action="token.create",
        target_type="api_token",
        target_id=record.token_id,
        now=now,
        details={"name": data.name, "role": data.role.value},
    )
    db.commit()
    return TokenCreated(**_read(record).model_dump(), token=secret)


@router.get("")
def list_tokens(admin: ApiAdmin, db: SessionDep) -> list[TokenRead]:
    return [_read(record) for record in tokens.list_tokens(db)]


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: str, admin: ApiAdmin, db: SessionDep, now: NowDep) -> Response:
    record = tokens.revoke_token(db, token_id, by=admin.actor, now=now)
    audit.record(
        db,
        actor=admin.actor,
        action="token.revoke",
        target_type="api_token",
        target_id=record.token_id,
        now=now,
        details={"name": record.name, "role": record.role},
    )
    db.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
