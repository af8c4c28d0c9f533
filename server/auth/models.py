"""Tables for panel users, browser sessions and driver PINs; the role ladder."""

from datetime import datetime
from enum import StrEnum

from sqlmodel import Field, SQLModel

from server.db import UTCDateTime

__all__ = ["ApiToken", "DriverCredential", "Role", "SessionKind", "User", "WebSession"]


class Role(StrEnum):
    """Operator roles, each allowed everything the roles below it are."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: "Role") -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class SessionKind(StrEnum):
    PANEL = "panel"
    DRIVER = "driver"


class User(SQLModel, table=True):
    """A person who signs in to the operator panel."""

    __tablename__ = "users"

    user_id: str = Field(primary_key=True, max_length=32)
    username: str = Field(max_length=64, unique=True, index=True)
    password_hash: str = Field(max_length=300)
    role: str = Field(max_length=16)
    active: bool = True
    created_at: datetime = Field(sa_type=UTCDateTime)
    last_login_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)


class WebSession(SQLModel, table=True):
    """A signed-in browser. The cookie holds a random token; only its SHA-256 is stored."""

    __tablename__ = "web_sessions"

    token_hash: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=8)
    subject: str = Field(max_length=64, index=True)  # user_id or account_id
    csrf_token: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class DriverCredential(SQLModel, table=True):
    """A driver's PIN for the driver page (hashed like a password)."""

    __tablename__ = "driver_credentials"

    account_id: str = Field(primary_key=True, max_length=36, foreign_key="accounts.account_id")
    pin_hash: str = Field(max_length=300)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """A bearer token for the REST API with a role. Only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    token_id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64)
    role: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=100)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    revoked_by: str | None = Field(default=None, max_length=100, nullable=True)
