"""Double-entry postings, pure: every transaction's signed amounts sum to zero.

Ledger accounts (a positive balance is money held for that account):

* ``wallet:{account}`` a driver's prepaid wallet;
* ``debt:{account}`` what a driver owes (negative while owed);
* ``revenue:lot:{lot}`` what a lot earned; ``refunds:lot:{lot}`` what it gave back;
* ``external:topup`` money that arrived from outside into wallets (credited by an operator);
* ``clearing:{provider}`` money a payment provider collected for us (negative) or gave back:
  card charges for stays and card top-ups of wallets.

Postings are only ever inserted; every balance is a sum of postings.

>>> [(p.ledger_account, p.amount_minor) for p in topup_postings("alice", 1000)]
[('wallet:alice', 1000), ('external:topup', -1000)]
>>> [(p.ledger_account, p.amount_minor) for p in topup_postings("bo", 500, "clearing:card")]
[('wallet:bo', 500), ('clearing:card', -500)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "TOPUP_SOURCE",
    "PostingSpec",
    "assert_balanced",
    "charge_postings",
    "clearing_account",
    "collect_postings",
    "debt_account",
    "payment_postings",
    "refund_postings",
    "refunds_account",
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


def debt_account(account_id: str) -> str:
    return f"debt:{account_id}"


def revenue_account(lot_id: str) -> str:
    return f"revenue:lot:{lot_id}"


def refunds_account(lot_id: str) -> str:
    return f"refunds:lot:{lot_id}"


def clearing_account(provider: str) -> str:
    return f"clearing:{provider}"


def assert_balanced(postings: Sequence[PostingSpec]) -> None:
    if len(postings) < 2 or sum(p.amount_minor for p in postings) != 0:
        raise ValueError("a ledger transaction needs two or more postings summing to zero")


def _positive(amount_minor: int, what: str) -> None:
    if amount_minor <= 0:
        raise ValueError(f"a {what} must be positive")


def topup_postings(
    account_id: str, amount_minor: int, source: str = TOPUP_SOURCE
) -> tuple[PostingSpec, ...]:
    """Money arriving into the driver's wallet from ``source`` (outside, or a card's clearing)."""
    _positive(amount_minor, "top-up")
    return (
        PostingSpec(wallet_account(account_id), amount_minor),
        PostingSpec(source, -amount_minor),
    )


def charge_postings(account_id: str, lot_id: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """A parking fee moving from the driver's wallet to the lot's revenue."""
    return payment_postings(wallet_account(account_id), lot_id, amount_minor)


def payment_postings(source: str, lot_id: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """A parking fee from ``source`` (a wallet, a provider's clearing, or a debt)."""
    _positive(amount_minor, "charge")
    return (PostingSpec(source, -amount_minor), PostingSpec(revenue_account(lot_id), amount_minor))


def collect_postings(source: str, account_id: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """Paying off part of a driver's debt from ``source`` (their wallet or a card)."""
    _positive(amount_minor, "collection")
    return (PostingSpec(source, -amount_minor), PostingSpec(debt_account(account_id), amount_minor))


def refund_postings(lot_id: str, destination: str, amount_minor: int) -> tuple[PostingSpec, ...]:
    """A lot giving money back to ``destination`` (a wallet, a card's clearing, a debt)."""
    _positive(amount_minor, "refund")
    return (
        PostingSpec(refunds_account(lot_id), -amount_minor),
        PostingSpec(destination, amount_minor),
    )
