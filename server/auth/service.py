"""Data access for users, browser sessions and driver PINs (in the caller's transaction)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from server.auth.models import DriverCredential, Role, SessionKind, User, WebSession
from server.auth.passwords import hash_password, verify_password, waste_time
from server.errors import ConflictError, NotFoundError, UnprocessableError

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "IssuedSession",
    "authenticate",
    "authenticate_driver",
    "count_users",
    "create_user",
    "end_session",
    "find_session",
    "list_users",
    "require_user",
    "set_driver_pin",
    "start_session",
    "update_user",
]

MIN_PASSWORD_LENGTH = 8


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def count_users(db: Session) -> int:
    return int(db.exec(select(sa.func.count()).select_from(User)).one())


def list_users(db: Session) -> list[User]:
    return list(db.exec(select(User).order_by(col(User.username))))


def require_user(db: Session, user_id: str) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise NotFoundError(f"user {user_id!r} not found")
    return user


def _by_name(db: Session, username: str) -> User | None:
    return db.exec(select(User).where(User.username == username)).first()


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UnprocessableError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def create_user(db: Session, *, username: str, password: str, role: Role, now: datetime) -> User:
    _check_password(password)
    if _by_name(db, username) is not None:
        raise ConflictError(f"user {username!r} already exists")
    user = User(
        user_id=uuid.uuid4().hex,
        username=username,
        password_hash=hash_password(password),
        role=role.value,
        created_at=now,
    )
    db.add(user)
    db.flush()
    return user


def update_user(
    db: Session,
    user: User,
    *,
    role: Role | None = None,
    active: bool | None = None,
    password: str | None = None,
) -> User:
    if password is not None:
        _check_password(password)
        user.password_hash = hash_password(password)
    if role is not None:
        user.role = role.value
    if active is not None:
        user.active = active
    db.add(user)
    db.flush()
    if active is False or password is not None:
        _end_all(db, SessionKind.PANEL, user.user_id)
    return user


def authenticate(db: Session, username: str, password: str, *, now: datetime) -> User | None:
    """The active user with this name and password, or None (same effort either way)."""
    user = _by_name(db, username)
    if user is None or not user.active:
        waste_time(password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    user.last_login_at = now
    db.add(user)
    db.flush()
    return user


def set_driver_pin(db: Session, account_id: str, pin: str, *, now: datetime) -> None:
    if not (4 <= len(pin) <= 64):
        raise UnprocessableError("a PIN needs 4 to 64 characters")
    record = db.get(DriverCredential, account_id)
    if record is None:
        record = DriverCredential(account_id=account_id, pin_hash="", updated_at=now)
    record.pin_hash = hash_password(pin)
    record.updated_at = now
    db.add(record)
    db.flush()
    _end_all(db, SessionKind.DRIVER, account_id)


def authenticate_driver(
    db: Session, account_id: str, pin: str, *, demo_pin: str | None, exists: bool
) -> bool:
    """Whether ``pin`` opens the driver page of ``account_id``.

    An account without a PIN of its own accepts ``demo_pin`` (development only).
    """
    record = db.get(DriverCredential, account_id) if exists else None
    if record is not None:
        return verify_password(record.pin_hash, pin)
    waste_time(pin)
    return exists and demo_pin is not None and secrets.compare_digest(pin, demo_pin)


@dataclass(frozen=True, slots=True)
class IssuedSession:
    token: str  # goes into the cookie; never stored
    record: WebSession


def start_session(
    db: Session, kind: SessionKind, subject: str, *, now: datetime, lifetime: timedelta
) -> IssuedSession:
    token = secrets.token_urlsafe(32)
    record = WebSession(
        token_hash=_token_hash(token),
        kind=kind.value,
        subject=subject,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + lifetime,
    )
    db.add(record)
    db.execute(sa.delete(WebSession).where(col(WebSession.expires_at) < now))
    db.flush()
    return IssuedSession(token, record)


def find_session(
    db: Session, kind: SessionKind, token: str | None, *, now: datetime
) -> WebSession | None:
    if not token or len(token) > 200:
        return None
    record = db.get(WebSession, _token_hash(token))
    if record is None or record.kind != kind.value or record.expires_at <= now:
        return None
    return record


def end_session(db: Session, token: str | None) -> None:
    if token and len(token) <= 200:
        db.execute(sa.delete(WebSession).where(col(WebSession.token_hash) == _token_hash(token)))


def _end_all(db: Session, kind: SessionKind, subject: str) -> None:
    db.execute(
        sa.delete(WebSession).where(
            col(WebSession.kind) == kind.value, col(WebSession.subject) == subject
        )
    )
