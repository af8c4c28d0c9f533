"""A money request that lost a database race is answered "retry", never a 500.

Locking in one order (see :mod:`server.payments.service`) keeps our own transactions from
deadlocking, but PostgreSQL may still abort one (a deadlock with a path not yet ordered, a
serialization failure, a lock timeout), and SQLite may stay locked past its busy timeout.
Nothing of the aborted transaction was committed, and every money endpoint takes an
Idempotency-Key, so the same request again is safe: :func:`busy_means_retry` turns those
errors into :class:`DatabaseBusy` (HTTP 503 with ``Retry-After``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from server.errors import DomainError

__all__ = ["RETRYABLE_SQLSTATES", "DatabaseBusy", "busy_means_retry", "is_retryable"]

log = logging.getLogger(__name__)

RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
    }
)


class DatabaseBusy(DomainError):
    """Another transaction held what this one needed; nothing was done (HTTP 503)."""

    status_code = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def is_retryable(exc: DBAPIError) -> bool:
    """A deadlock, serialization failure or lock timeout (PostgreSQL), or SQLite locked."""
    state = getattr(exc.orig, "sqlstate", None)
    if isinstance(state, str):
        return state in RETRYABLE_SQLSTATES
    return "database is locked" in str(exc.orig)


@contextmanager
def busy_means_retry(db: Session) -> Iterator[None]:
    """Run a money request; a retryable database error rolls it back and is a 503."""
    try:
        yield
    except DBAPIError as exc:
        if not is_retryable(exc):
            raise
        db.rollback()
        log.warning("money request rolled back, the client is asked to retry: %s", exc.orig)
        raise DatabaseBusy(
            "The database was busy with another payment for this stay or account, so "
            "nothing was done. Retry the request with the same Idempotency-Key."
        ) from None
