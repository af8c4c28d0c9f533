"""Domain errors the services raise; the app turns them into clear JSON 4xx answers."""

from __future__ import annotations

import math

__all__ = [
    "ConflictError",
    "DomainError",
    "ForbiddenError",
    "NotFoundError",
    "RateLimitedError",
    "UnauthorizedError",
    "UnprocessableError",
]


class DomainError(Exception):
    """A request the service refuses; ``status_code`` is what an HTTP client sees."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After``, ``WWW-Authenticate``)."""
        return {}


class NotFoundError(DomainError):
    status_code = 404


class ConflictError(DomainError):
    status_code = 409


class UnprocessableError(DomainError):
    status_code = 422


class UnauthorizedError(DomainError):
    """No credentials, or credentials that are not (or no longer) valid."""

    status_code = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="qrpark"'}


class ForbiddenError(DomainError):
    """Known caller, not allowed to do this."""

    status_code = 403


class RateLimitedError(DomainError):
    status_code = 429

    def __init__(self, detail: str, *, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
