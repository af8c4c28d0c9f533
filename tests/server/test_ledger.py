"""Double-entry postings are balanced by construction."""

from __future__ import annotations

import pytest

from server.accounts.ledger import (
    PostingSpec,
    assert_balanced,
    charge_postings,
    topup_postings,
)


def test_topup_credits_the_wallet_from_outside() -> None:
    assert [(p.ledger_account, p.amount_minor) for p in topup_postings("alice", 1000)] == [
        ("wallet:alice", 1000),
        ("external:topup", -1000),
    ]


def test_charge_moves_money_to_the_lot_revenue() -> None:
    postings = charge_postings("alice", "lot1", 1500)

    assert [(p.ledger_account, p.amount_minor) for p in postings] == [
        ("wallet:alice", -1500),
        ("revenue:lot:lot1", 1500),
    ]
    assert_balanced(postings)


@pytest.mark.parametrize("amount", [0, -5])
def test_non_positive_amounts_are_refused(amount: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        topup_postings("alice", amount)
    with pytest.raises(ValueError, match="positive"):
        charge_postings("alice", "lot1", amount)


def test_unbalanced_postings_are_refused() -> None:
    with pytest.raises(ValueError, match="zero"):
        assert_balanced([PostingSpec("wallet:a", 5), PostingSpec("external:topup", -4)])
    with pytest.raises(ValueError, match="zero"):
        assert_balanced([PostingSpec("wallet:a", 0)])
