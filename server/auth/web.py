"""The HTTP side of sign-in: cookies, the signed-in principal as a dependency, CSRF checks.

Pages and JSON share one rule set: anonymous -> :class:`LoginRequired` (a redirect for a
page, 401 for JSON), a role too low -> :class:`AccessDenied` (403), a state-changing request
without the session's CSRF token or from another site -> :class:`CsrfRefused` (403).
"""

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response

from server.auth import service
from server.auth.models import Role, SessionKind, User
from server.deps import NowDep, SessionDep

__all__ = [
    "DRIVER_COOKIE",
    "LOGIN_CSRF_COOKIE",
    "PANEL_COOKIE",
    "AccessDenied",
    "AdminDep",
    "AdminWriter",
    "CsrfRefused",
    "Driver",
    "DriverDep",
    "DriverWriter",
    "LoginRequired",
    "Operator",
    "OperatorWriter",
    "ViewerDep",
    "ViewerWriter",
    "check_csrf",
    "clear_cookie",
    "client_address",
    "current_driver",
    "current_operator",
    "set_cookie",
    "wants_json",
]

PANEL_COOKIE = "qrpark_session"
DRIVER_COOKIE = "qrpark_driver"
LOGIN_CSRF_COOKIE = "qrpark_login_csrf"


class LoginRequired(Exception):
    def __init__(self, kind: SessionKind, *, api: bool) -> None:
        super().__init__("sign-in required")
        self.kind = kind
        self.api = api


class AccessDenied(Exception):
    def __init__(self, needed: Role, *, api: bool) -> None:
        super().__init__(f"needs the {needed.value} role")
        self.needed = needed
        self.api = api


class CsrfRefused(Exception):
    def __init__(self, detail: str, *, api: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.api = api


@dataclass(frozen=True, slots=True)
class Operator:
    user_id: str
    username: str
    role: Role
    csrf_token: str
    kind: str = "user"  # "user" (panel cookie) or "token" (an API token; username is its name)

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.username}"

    def can(self, role: Role) -> bool:
        return self.role.allows(role)


@dataclass(frozen=True, slots=True)
class Driver:
    account_id: str
    csrf_token: str

    @property
    def actor(self) -> str:
        return f"driver:{self.account_id}"


def wants_json(request: Request) -> bool:
    return "/api/" in request.url.path or request.url.path.endswith((".json", "/events"))


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def set_cookie(
    response: Response, central_dev: bool, name: str, value: str, *, path: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="lax",
        secure=not central_dev,
    )


def clear_cookie(response: Response, central_dev: bool, name: str, *, path: str) -> None:
    response.delete_cookie(name, path=path, httponly=True, samesite="lax", secure=not central_dev)


def current_operator(request: Request, db: SessionDep, now: NowDep) -> Operator | None:
    record = service.find_session(db, SessionKind.PANEL, request.cookies.get(PANEL_COOKIE), now=now)
    user = None if record is None else db.get(User, record.subject)
    db.commit()  # end the read transaction: SQLite holds a write lock until then
    if record is None or user is None or not user.active:
        return None
    return Operator(user.user_id, user.username, Role(user.role), record.csrf_token)


def current_driver(request: Request, db: SessionDep, now: NowDep) -> Driver | None:
    record = service.find_session(
        db, SessionKind.DRIVER, request.cookies.get(DRIVER_COOKIE), now=now
    )
    db.commit()  # end the read transaction: SQLite holds a write lock until then
    return None if record is None else Driver(record.subject, record.csrf_token)


def _same_site(request: Request) -> bool:
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", request.url.netloc)


async def check_csrf(request: Request, expected: str) -> None:
    """Refuse a cross-site request or one without the expected token (header or form)."""
    api = wants_json(request)
    if not _same_site(request):
        raise CsrfRefused("cross-site request refused", api=api)
    token = request.headers.get("x-csrf-token")
    if token is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get("csrf_token")
        token = value if isinstance(value, str) else None
    if not token or not secrets.compare_digest(token.encode(), expected.encode()):
        raise CsrfRefused("missing or wrong CSRF token; reload the page", api=api)


def _require(role: Role) -> Callable[[Request, SessionDep, NowDep], Operator]:
    def dependency(request: Request, db: SessionDep, now: NowDep) -> Operator:
        operator = current_operator(request, db, now)
        if operator is None:
            raise LoginRequired(SessionKind.PANEL, api=wants_json(request))
        if not operator.can(role):
            raise AccessDenied(role, api=wants_json(request))
        return operator

    return dependency


def _writer(role: Role) -> Callable[[Request, Operator], Awaitable[Operator]]:
    async def dependency(
        request: Request, operator: Annotated[Operator, Depends(_require(role))]
    ) -> Operator:
        await check_csrf(request, operator.csrf_token)
        return operator

    return dependency


def _driver(request: Request, db: SessionDep, now: NowDep) -> Driver:
    driver = current_driver(request, db, now)
    if driver is None:
        raise LoginRequired(SessionKind.DRIVER, api=wants_json(request))
    return driver


async def _driver_writer(request: Request, driver: Annotated[Driver, Depends(_driver)]) -> Driver:
    await check_csrf(request, driver.csrf_token)
    return driver


ViewerDep = Annotated[Operator, Depends(_require(Role.VIEWER))]
"""Any signed-in operator (read-only pages)."""
ViewerWriter = Annotated[Operator, Depends(_writer(Role.VIEWER))]
"""Any signed-in operator, on a same-site request carrying the CSRF token (sign out)."""
OperatorWriter = Annotated[Operator, Depends(_writer(Role.OPERATOR))]
"""An operator or admin, on a same-site request carrying the CSRF token."""
AdminWriter = Annotated[Operator, Depends(_writer(Role.ADMIN))]
AdminDep = Annotated[Operator, Depends(_require(Role.ADMIN))]
DriverDep = Annotated[Driver, Depends(_driver)]
DriverWriter = Annotated[Driver, Depends(_driver_writer)]
