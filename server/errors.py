"""Domain errors the services raise; the app turns them into clear JSON 4xx answers."""

from __future__ import annotations

__all__ = ["ConflictError", "DomainError", "NotFoundError", "UnprocessableError"]


class DomainError(Exception):
    """A request the service refuses; ``status_code`` is what an HTTP client sees."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(DomainError):
    status_code = 404


class ConflictError(DomainError):
    status_code = 409


class UnprocessableError(DomainError):
    status_code = 422
