"""API tokens: create (shown once), find by hash, list, revoke; in the caller's transaction."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

from sqlmodel import Session, col, select

from server.auth.models import ApiToken, Role
from server.errors import ConflictError, NotFoundError

__all__ = [
    "TOKEN_PREFIX",
    "bootstrap_token",
    "create_token",
    "find_token",
    "list_tokens",
    "revoke_token",
    "token_hash",
]

TOKEN_PREFIX = "qrp_"  # noqa: S105 - a prefix, not a secret
MAX_TOKEN_LENGTH = 200


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    db: Session, *, name: str, role: Role, created_by: str, now: datetime
) -> tuple[ApiToken, str]:
    """A new token and its secret (returned once, never stored)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = ApiToken(
        token_id=uuid.uuid4().hex,
        name=name,
        role=role.value,
        token_hash=token_hash(secret),
        created_at=now,
        created_by=created_by,
    )
    db.add(record)
    db.flush()
    return record, secret


def bootstrap_token(db: Session, secret: str, *, now: datetime) -> ApiToken | None:
    """Register the configured bootstrap token (admin) unless it is known, even as revoked."""
    digest = token_hash(secret)
    if db.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first() is not None:
        return None
    record = ApiToken(
        token_id=f"bootstrap-{digest[:16]}",
        name="bootstrap",
        role=Role.ADMIN.value,
        token_hash=digest,
        created_at=now,
        created_by="system",
    )
    db.add(record)
    db.flush()
    return record


def find_token(db: Session, secret: str) -> ApiToken | None:
    """The live (not revoked) token with this secret, or None."""
    if not secret or len(secret) > MAX_TOKEN_LENGTH:
        return None
    record = db.exec(select(ApiToken).where(ApiToken.token_hash == token_hash(secret))).first()
    if record is None or record.revoked_at is not None:
        return None
    return record


def list_tokens(db: Session) -> list[ApiToken]:
    return list(db.exec(select(ApiToken).order_by(col(ApiToken.created_at), col(ApiToken.name))))


def revoke_token(db: Session, token_id: str, *, by: str, now: datetime) -> ApiToken:
    record = db.get(ApiToken, token_id)
    if record is None:
        raise NotFoundError(f"token {token_id!r} not found")
    if record.revoked_at is not None:
        raise ConflictError(f"token {token_id!r} is already revoked")
    record.revoked_at = now
    record.revoked_by = by
    db.add(record)
    db.flush()
    return record
