"""Helpers for the money tests: a desk that delivers scan events straight to the flow (the
bridge's code path without MQTT), and ledger audits that cross-check postings against
payments, refunds and top-ups."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, select

from parking_protocol.clock import FakeClock
from parking_protocol.messages import EventAck, GateCommand, ScanEvent, new_id
from parking_protocol.topics import TopicKind, TopicRef
from parking_protocol.types import Direction
from server.accounts.models import (
    Account,
    LedgerTransaction,
    Posting,
    TopupRead,
    TopupRequest,
)
from server.central import Central
from server.payments.models import Payment, Refund
from server.payments.provider import SandboxCardProvider
from server.sessions.flows import handle_scan


@dataclass
class Desk:
    """Plays the gateways of one lot: entry gate ``in1``, exit gate ``out1``."""

    central: Central
    clock: FakeClock
    lot_id: str = "lot1"
    history: list[tuple[datetime, ScanEvent]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def event(self, account_id: str, direction: Direction) -> ScanEvent:
        return ScanEvent(
            event_id=new_id(),
            lot_id=self.lot_id,
            gate_id="in1" if direction == Direction.ENTRY else "out1",
            seq=next(self._seq),
            boot=1,
            direction=direction,
            code=self.central.issue_code(account_id).code,
            scanned_at=self.clock.now(),
        )

    def deliver(self, event: ScanEvent, *, at: datetime | None = None) -> GateCommand | EventAck:
        """Handle one event in its own transaction, as the bridge does; remember it."""
        now = at or self.clock.now()
        self.history.append((now, event))
        ref = TopicRef(event.lot_id, event.gate_id, TopicKind.EVENTS)
        with self.central.db() as db:
            reply = handle_scan(db, event, ref, now=now, config=self.central.flow_config)
        return reply.message

    def enter(self, account_id: str) -> GateCommand:
        reply = self.deliver(self.event(account_id, Direction.ENTRY))
        assert isinstance(reply, GateCommand)
        return reply

    def exit(self, account_id: str) -> GateCommand:
        reply = self.deliver(self.event(account_id, Direction.EXIT))
        assert isinstance(reply, GateCommand)
        return reply


def sandbox(central: Central) -> SandboxCardProvider:
    card = central.flow_config.payments.card
    assert isinstance(card, SandboxCardProvider)
    return card


def balances(central: Central) -> dict[tuple[str, str], int]:
    """Every ledger account's balance, derived from postings."""
    with Session(central.engine) as db:
        rows = db.exec(
            select(
                Posting.ledger_account, Posting.currency, sa.func.sum(Posting.amount_minor)
            ).group_by(Posting.ledger_account, Posting.currency)
        ).all()
    return {(account, currency): int(total) for account, currency, total in rows}


def ledger_shape(central: Central) -> Counter[tuple[object, ...]]:
    """The ledger without its random ids: (time, kind, account, postings) per transaction."""
    with Session(central.engine) as db:
        transactions = db.exec(select(LedgerTransaction)).all()
        postings = db.exec(select(Posting)).all()
    by_transaction: dict[str, list[tuple[str, int]]] = {}
    for posting in postings:
        by_transaction.setdefault(posting.transaction_id, []).append(
            (posting.ledger_account, posting.amount_minor)
        )
    return Counter(
        (t.created_at, t.kind, t.account_id, tuple(sorted(by_transaction[t.transaction_id])))
        for t in transactions
    )


def audit_ledger(central: Central) -> None:
    """The ledger is balanced and agrees with every business record that moved money."""
    with Session(central.engine) as db:
        unbalanced = db.exec(
            select(Posting.transaction_id)
            .group_by(Posting.transaction_id)
            .having(sa.func.sum(Posting.amount_minor) != 0)
        ).all()
        assert unbalanced == []
        total = db.exec(select(sa.func.coalesce(sa.func.sum(Posting.amount_minor), 0))).one()
        assert total == 0
        lonely = db.exec(
            select(LedgerTransaction.transaction_id)
            .outerjoin(Posting, Posting.transaction_id == LedgerTransaction.transaction_id)
            .where(Posting.posting_id == None)  # noqa: E711
        ).all()
        assert lonely == []
        accounts = db.exec(select(Account)).all()
        payments = db.exec(select(Payment)).all()
        refunds = db.exec(select(Refund)).all()
        topups = db.exec(select(TopupRequest)).all()
    ledger = balances(central)
    method_of = {p.payment_id: p.method for p in payments}
    for account in accounts:
        a, cur = account.account_id, account.currency
        topped = sum(_topup_amount(t) for t in topups if t.account_id == a)
        paid = sum(p.amount_minor for p in payments if p.account_id == a and p.method == "wallet")
        back = sum(
            r.amount_minor
            for r in refunds
            if method_of[r.payment_id] == "wallet"
            and any(p.payment_id == r.payment_id and p.account_id == a for p in payments)
        )
        wallet = ledger.get((f"wallet:{a}", cur), 0)
        assert wallet == topped - paid + back, f"wallet of {a}"
        assert wallet >= 0, f"wallet of {a} went negative"
        owed = sum(p.amount_minor for p in payments if p.account_id == a and p.status == "owed")
        assert -ledger.get((f"debt:{a}", cur), 0) == owed, f"debt of {a}"
    revenue = sum(p.amount_minor for p in payments if p.collects_payment_id is None)
    assert sum(v for (k, _), v in ledger.items() if k.startswith("revenue:")) == revenue
    assert sum(v for (k, _), v in ledger.items() if k.startswith("refunds:")) == -sum(
        r.amount_minor for r in refunds
    )
    card_in = sum(p.amount_minor for p in payments if p.method == "card")
    card_back = sum(r.amount_minor for r in refunds if method_of[r.payment_id] == "card")
    card_topups = sum(_topup_amount(t) for t in topups if _topup_method(t) == "card")
    assert ledger.get(("clearing:card", "CNY"), 0) == -card_in + card_back - card_topups
    assert sandbox(central).captured_minor() == card_in + card_topups


def _topup_amount(request: TopupRequest) -> int:
    return TopupRead.model_validate_json(request.response_json).amount_minor


def _topup_method(request: TopupRequest) -> str:
    return TopupRead.model_validate_json(request.response_json).method
