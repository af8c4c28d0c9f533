"""Argon2id password hashing (argon2-cffi), with a constant-effort miss for unknown users."""

from __future__ import annotations

from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["hash_password", "verify_password", "waste_time"]


@cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id with the library's RFC 9106 low-memory profile


@cache
def _dummy_hash() -> str:
    return _hasher().hash("not-a-real-password")


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher().verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def waste_time(password: str) -> None:
    """Spend what a real check costs, so a missing user is not told apart by timing."""
    verify_password(_dummy_hash(), password)
