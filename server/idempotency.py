"""Idempotency keys in flight: a committed marker row per (scope, key) while a request runs.

The stored answer (``TopupRequest``, ``IdempotencyRecord``) makes a *finished* request
replayable; this marker makes a *concurrent* one with the same key a clear 409 instead of a
race. The marker is written and removed in its own short transactions (its own connection),
so every process on SQLite or PostgreSQL sees it. A marker left behind by a crash is taken
over once it is older than ``STALE_AFTER``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col

from server.db import UTCDateTime
from server.errors import ConflictError

__all__ = ["KEY_RESPONSES", "STALE_AFTER", "InFlightKey", "in_flight"]

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=2)


class InFlightKey(SQLModel, table=True):
    """An Idempotency-Key whose request is running now."""

    __tablename__ = "idempotency_in_flight"

    scope: str = Field(primary_key=True, max_length=100)
    key: str = Field(primary_key=True, max_length=200)
    owner: str = Field(max_length=32)
    started_at: datetime = Field(sa_type=UTCDateTime)


def _claim(engine: Engine, scope: str, key: str, owner: str, now: datetime) -> bool:
    with Session(engine) as db:
        db.add(InFlightKey(scope=scope, key=key, owner=owner, started_at=now))
        try:
            db.commit()
            return True
        except IntegrityError:
            db.rollback()
        taken_over = db.execute(
            sa.update(InFlightKey)
            .where(
                col(InFlightKey.scope) == scope,
                col(InFlightKey.key) == key,
                col(InFlightKey.started_at) < now - STALE_AFTER,
            )
            .values(owner=owner, started_at=now)
        )
        db.commit()
        return bool(taken_over.rowcount == 1)  # type: ignore[attr-defined]


def _release(engine: Engine, scope: str, key: str, owner: str) -> None:
    try:
        with Session(engine) as db:
            db.execute(
                sa.delete(InFlightKey).where(
                    col(InFlightKey.scope) == scope,
                    col(InFlightKey.key) == key,
                    col(InFlightKey.owner) == owner,
                )
            )
            db.commit()
    except SQLAlchemyError:
        log.exception("in-flight marker %s/%s not removed (taken over when stale)", scope, key)


@contextmanager
def in_flight(
    engine: Engine, request_db: Session, *, scope: str, key: str, now: datetime
) -> Iterator[None]:
    """Run the block as the only request holding ``key`` in ``scope``; else ConflictError (409).

    ``request_db`` (the request's session) is rolled back before the marker is removed, so an
    open SQLite transaction never blocks the removal; commit what the block changes inside it.
    """
    owner = secrets.token_hex(16)
    scope, key = scope[:100], key[:200]
    request_db.rollback()
    if not _claim(engine, scope, key, owner, now):
        raise ConflictError(
            "a request with this Idempotency-Key is still in flight; retry when it has finished"
        )
    try:
        yield
    finally:
        request_db.rollback()
        _release(engine, scope, key, owner)


# OpenAPI: the answers every endpoint taking an Idempotency-Key can give besides success.
KEY_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "A request with this key is still in flight: retry later"},
    422: {"description": "Invalid body, or the key was used with another body"},
}
