"""Who may call the REST API (``/api/v1``), as FastAPI dependencies.

A caller is one of:

- an **API token** (``Authorization: Bearer qrp_…``) with a role — integrations, scripts, the
  demo and the simulators. A token is never asked for CSRF (browsers do not attach it).
- the **panel's session cookie** with the signed-in user's role; unsafe methods also need
  the session's CSRF token (``X-CSRF-Token``) on a same-site request, like the panel.
- the **driver page's cookie**: that driver may read their own account and issue their own
  codes, nothing else.

Roles: ``viewer`` reads; ``operator`` also tops up, refunds, opens gates and blocks accounts;
``admin`` also changes tariffs, lots, gates, users and tokens. A driver's code is issued only
to that driver or to an operator/admin **token** (a panel user cannot mint codes).

Sent credentials that are wrong are a 401 (never a silent fall back to anonymous); repeated
wrong tokens from one address are a 429 with ``Retry-After``. Code issuing is limited per
account by a token bucket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from server.auth import tokens
from server.auth.models import Role
from server.auth.throttle import LoginThrottle, TokenBucket
from server.auth.web import Driver, Operator, check_csrf, client_address, current_driver
from server.auth.web import current_operator as panel_operator
from server.central import Central
from server.config import ServerSettings
from server.deps import CentralDep, NowDep
from server.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from server.readcache import CachedToken

__all__ = [
    "AccountReader",
    "ApiAdmin",
    "ApiLimits",
    "ApiOperator",
    "ApiViewer",
    "Caller",
    "CodeIssuer",
    "limit_codes",
    "staff",
]

Caller = Operator | Driver
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token: `Authorization: Bearer qrp_…` (admins create them at "
    "/api/v1/tokens; the first one comes from QRPARK_BOOTSTRAP_API_TOKEN).",
)


@dataclass(slots=True)
class ApiLimits:
    """The API's in-process rate limits (per process; several processes each apply them)."""

    bad_tokens: LoginThrottle
    codes: TokenBucket

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ApiLimits:
        return cls(
            bad_tokens=LoginThrottle(max_failures=10, window=timedelta(minutes=15)),
            codes=TokenBucket(per_minute=settings.code_rate_per_minute, burst=settings.code_burst),
        )


def _limits(request: Request) -> ApiLimits:
    limits: ApiLimits = request.app.state.api_limits
    return limits


@dataclass(frozen=True, slots=True)
class _Found:
    token: Operator | None = None
    operator: Operator | None = None
    driver: Driver | None = None


async def _identify(
    request: Request,
    central: CentralDep,
    now: NowDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> _Found:
    """Read the credentials a request carries (a known token costs no database read)."""
    if "authorization" in request.headers:
        record = await _live_token(central, bearer.credentials if bearer is not None else "")
        if record is None:
            _refuse_token(request, now)
        assert record is not None
        token = Operator(record.token_id, record.name, Role(record.role), "", kind="token")
        return _Found(token=token)
    if not request.cookies:
        return _Found()
    return await run_in_threadpool(_from_cookies, request, central, now)


def _from_cookies(request: Request, central: Central, now: datetime) -> _Found:
    with Session(central.engine, expire_on_commit=False) as db:
        operator = panel_operator(request, db, now)
        return _Found(operator=operator, driver=current_driver(request, db, now))


async def _live_token(central: Central, secret: str) -> CachedToken | None:
    """The live token with this secret, from the process's token cache or the database."""
    if not secret or len(secret) > tokens.MAX_TOKEN_LENGTH:
        return None
    digest = tokens.token_hash(secret)
    cached = central.tokens.get(digest)
    if cached is not None:
        return cached
    # One database lookup per token at a time: when a busy token's entry expires, the
    # requests that miss meanwhile wait for that lookup instead of each making its own
    # (50 connections polling with one token missed together every ttl).
    shared = central.tokens.loading.get(digest)
    if shared is not None:
        waited, began = shared
        await asyncio.wait([waited])
        if (
            not waited.cancelled()
            and waited.exception() is None
            and central.tokens.epoch() == began
        ):
            return waited.result()
        # That lookup failed, was cancelled with its request, or began before a revocation
        # (the cache was cleared since): look up on our own.
    loading: asyncio.Future[CachedToken | None] = asyncio.get_running_loop().create_future()
    epoch = central.tokens.epoch()
    central.tokens.loading[digest] = (loading, epoch)
    try:
        found = await run_in_threadpool(_load_token, central, secret)
        if found is not None:
            central.tokens.put(digest, found, epoch=epoch)
    except BaseException:
        loading.cancel()
        raise
    else:
        loading.set_result(found)
    finally:
        current = central.tokens.loading.get(digest)
        if current is not None and current[0] is loading:
            del central.tokens.loading[digest]
    return found


def _load_token(central: Central, secret: str) -> CachedToken | None:
    with Session(central.read_engine) as db:
        record = tokens.find_token(db, secret)
        return None if record is None else CachedToken(record.token_id, record.name, record.role)


def _refuse_token(request: Request, now: datetime) -> None:
    throttle = _limits(request).bad_tokens
    keys = [f"ip:{client_address(request)}"]
    if throttle.blocked(keys, now):
        wait = throttle.retry_after(keys, now).total_seconds()
        raise RateLimitedError("too many invalid API tokens from this address", retry_after_s=wait)
    throttle.fail(keys, now)
    raise UnauthorizedError("invalid or revoked API token")


FoundDep = Annotated[_Found, Depends(_identify)]


def _anonymous() -> UnauthorizedError:
    return UnauthorizedError("authentication required: send Authorization: Bearer <API token>")


def _check_role(caller: Operator, role: Role) -> None:
    if not caller.can(role):
        raise ForbiddenError(f"this needs the {role.value} role")


async def _csrf_if_unsafe(request: Request, expected: str) -> None:
    if request.method not in SAFE_METHODS:
        await check_csrf(request, expected)


def staff(role: Role) -> Callable[[Request, _Found], Awaitable[Operator]]:
    async def dependency(request: Request, found: FoundDep) -> Operator:
        if found.token is not None:
            _check_role(found.token, role)
            return found.token
        if found.operator is not None:
            _check_role(found.operator, role)
            await _csrf_if_unsafe(request, found.operator.csrf_token)
            return found.operator
        if found.driver is not None:
            raise ForbiddenError("a driver may only read their own account and issue their codes")
        raise _anonymous()

    return dependency


async def _account_reader(request: Request, account_id: str, found: FoundDep) -> Caller:
    """Staff with ``viewer``, or the driver whose account it is."""
    if found.token is not None or found.operator is not None:
        return await staff(Role.VIEWER)(request, found)
    if found.driver is not None:
        if found.driver.account_id != account_id:
            raise ForbiddenError("a driver may only read their own account")
        return found.driver
    raise _anonymous()


def limit_codes(request: Request, account_id: str, now: datetime) -> None:
    """At most the configured burst/rate of codes per account, whoever asks."""
    wait = _limits(request).codes.take(account_id, now)
    if wait is not None:
        raise RateLimitedError(
            "codes for this account are issued too often; wait a moment", retry_after_s=wait
        )


async def _code_issuer(request: Request, account_id: str, found: FoundDep, now: NowDep) -> Caller:
    """The driver whose account it is, or an operator/admin API token; rate limited."""
    caller: Caller
    if found.token is not None:
        _check_role(found.token, Role.OPERATOR)
        caller = found.token
    elif found.driver is not None and found.driver.account_id == account_id:
        await _csrf_if_unsafe(request, found.driver.csrf_token)
        caller = found.driver
    elif found.operator is not None or found.driver is not None:
        raise ForbiddenError(
            "a driver's code is issued only to that driver or to an operator/admin API token"
        )
    else:
        raise _anonymous()
    limit_codes(request, account_id, now)
    return caller


ApiViewer = Annotated[Operator, Depends(staff(Role.VIEWER))]
"""A token or panel user with at least ``viewer`` (CSRF-checked for cookie writes)."""
ApiOperator = Annotated[Operator, Depends(staff(Role.OPERATOR))]
ApiAdmin = Annotated[Operator, Depends(staff(Role.ADMIN))]
AccountReader = Annotated[Caller, Depends(_account_reader)]
"""Staff with ``viewer``, or the signed-in driver of the ``{account_id}`` in the path."""
CodeIssuer = Annotated[Caller, Depends(_code_issuer)]
"""The signed-in driver of ``{account_id}`` or an operator/admin token; rate limited."""
