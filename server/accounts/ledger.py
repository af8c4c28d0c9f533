"""Double-entry postings, pure: every transaction's signed amounts sum to zero.

A wallet's balance is the sum of its postings; postings are only ever inserted.

>>> [(p.ledger_account, p.amount_minor) for p in topup_postings("alice", 1000)]
[('wallet:alice', 1000), ('external:topup', -1000)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PostingSpec",
    "assert_balanced",
    "charge_postings",
    "revenue_account",
    "topup_postings",
    "wallet_account",
]

TOPUP_SOURCE = "external:topup"


@dataclass(frozen=True, slots=True)
class PostingSpec:
    ledger_account: str
    amount_minor: int


def wallet_account(account_id: str) -> str:
    return f"wallet:{account_id}"


def revenue_account(lot_id: str) -> str:
    return f"revenue:lot:{lot_id}"


def assert_balanced(postings: Sequence[PostingSpec]) -> None:
    if len(postings) < 2 or sum(p.amount_minor for p in postings) != 0:
        raise ValueError("a ledger transaction needs two or more postings summing to zero")


def topup_postings(account_id: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """Money arriving from outside into the driver's wallet."""
    if amount_minor <= 0:
        raise ValueError("a top-up must be positive")
    return (
        PostingSpec(wallet_account(account_id), amount_minor),
        PostingSpec(TOPUP_SOURCE, -amount_minor),
    )


def charge_postings(account_id: str, lot_id: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """A parking fee moving from the driver's wallet to the lot's revenue."""
    if amount_minor <= 0:
        raise ValueError("a charge must be positive")
    return (
        PostingSpec(wallet_account(account_id), -amount_minor),
        PostingSpec(revenue_account(lot_id), amount_minor),
    )
