"""The hot path for the common scans: a run of online events decided with a few prebuilt,
batched statements instead of the ORM flow's dozen per event.

:func:`server.sessions.flows.handle_scan` decides any event, one at a time, through the
ORM: ≈ 12 statements for an entry and 24 for an exit, ≈ 0.4 ms of Python each. Most of the
traffic of a busy lot is two cases — an online entry with a fresh code, and an online exit
of an open stay paid from the wallet (or free) — and those need only a handful of facts
that can be read for a whole batch at once. :meth:`FastPath.decide` does that:

1. reads, for every event of the run together, what deciding needs (processed event ids,
   gates, lots, spent nonces, accounts, open stays, pending offline scans, occupancy,
   permits, validations, payment keys, wallet balances, tariff versions) — on PostgreSQL
   the stays and then the accounts locked ``FOR UPDATE``, in the order the ORM flow locks
   them; only lots and gates are cached, for ``ref_ttl`` (2 s), dropped at once when this
   process changes one (:meth:`FastPath.forget`), so another process's change to a lot's
   capacity or a gate's direction shows within 2 s;
2. decides each event in order in memory, keeping what earlier events of the run did (a
   stay opened, a wallet debited, a code spent, an event answered), with the same rules and
   the same answers as the ORM flow;
3. writes everything with one ``executemany`` per table.

It stops at the first event it does not handle the same way for certain: an offline
decision to reconcile, an account with pending offline scans in the lot, an exit with no
open stay (lost ticket), or whose stay began after it, a card payer, a permit holder, a
validated or prepaid stay, a short wallet where the lot lets cars out owing, a reopened
stay's payment key. The caller then hands that event to the ORM flow and calls
:meth:`decide` again for the rest, so every event is decided by exactly one of the two, in
batch order, inside the caller's transaction (its SAVEPOINT makes the run's writes all or
nothing).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from parking_protocol.messages import EventAck, GateCommand, ScanEvent, decode, new_id
from parking_protocol.qr_token import CodeClaims
from parking_protocol.topics import TopicKind, TopicRef, gate_topic
from parking_protocol.types import Direction, GateAction, Money, Reason
from server.accounts.ledger import payment_postings, wallet_account
from server.accounts.models import Account, LedgerTransaction, Posting
from server.gateways.models import Gate
from server.lots.models import Lot
from server.payments.models import Payment, Permit, Validation
from server.pricing.adjust import price_stay
from server.pricing.engine import Tariff
from server.pricing.models import TariffVersion
from server.pricing.service import tariff_of
from server.sessions.flows import (
    FlowConfig,
    Reply,
    _command_for,
    _Decision,
    _verify,
    event_time,
)
from server.sessions.models import (
    ParkingSession,
    PendingScan,
    ProcessedEvent,
    SessionState,
    UsedNonce,
    state_in,
)
from server.sessions.prepared import Pending, Prepared, pipeline

__all__ = ["FastPath", "Item"]

Item = tuple[ScanEvent, TopicRef]

_sessions = ParkingSession.__table__  # type: ignore[attr-defined]
_nonces = UsedNonce.__table__  # type: ignore[attr-defined]
_processed = ProcessedEvent.__table__  # type: ignore[attr-defined]
_pending = PendingScan.__table__  # type: ignore[attr-defined]
_accounts = Account.__table__  # type: ignore[attr-defined]
_gates = Gate.__table__  # type: ignore[attr-defined]
_lots = Lot.__table__  # type: ignore[attr-defined]
_transactions = LedgerTransaction.__table__  # type: ignore[attr-defined]
_postings = Posting.__table__  # type: ignore[attr-defined]
_payments = Payment.__table__  # type: ignore[attr-defined]
_permits = Permit.__table__  # type: ignore[attr-defined]
_validations = Validation.__table__  # type: ignore[attr-defined]
_versions = TariffVersion.__table__  # type: ignore[attr-defined]


def _in(column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
    return column.in_(sa.bindparam(name, expanding=True))


# Built once; each is executed once per run with lists bound to its expanding parameters.
_Q_PROCESSED = sa.select(
    _processed.c.event_id, _processed.c.lot_id, _processed.c.gate_id, _processed.c.reply_json
).where(_in(_processed.c.event_id, "ids"))
_Q_GATES = sa.select(_gates.c.lot_id, _gates.c.gate_id, _gates.c.direction).where(
    _in(_gates.c.lot_id, "lots")
)
_Q_LOTS = sa.select(
    _lots.c.lot_id,
    _lots.c.capacity,
    _lots.c.currency,
    _lots.c.timezone,
    _lots.c.payment_policy,
).where(_in(_lots.c.lot_id, "lots"))
_Q_NONCES = sa.select(_nonces.c.nonce).where(_in(_nonces.c.nonce, "nonces"))
_Q_ACCOUNTS = (
    sa.select(_accounts.c.account_id, _accounts.c.blocked, _accounts.c.payment_method)
    .where(_in(_accounts.c.account_id, "accounts"))
    .order_by(_accounts.c.account_id)
)
_Q_OPEN = (
    sa.select(
        _sessions.c.session_id,
        _sessions.c.account_id,
        _sessions.c.lot_id,
        _sessions.c.entered_at,
        _sessions.c.prepaid_minor,
        _sessions.c.prepaid_at,
    )
    .where(_in(_sessions.c.account_id, "accounts"), state_in(SessionState.OPEN))
    .order_by(_sessions.c.session_id)
)
_Q_LAST_CLOSED = (
    sa.select(
        _sessions.c.account_id,
        _sessions.c.lot_id,
        sa.func.max(_sessions.c.entered_at).label("entered_at"),
    )
    .where(
        _in(_sessions.c.account_id, "accounts"),
        state_in(SessionState.CLOSED),
        _sessions.c.lost_ticket.is_(False),
    )
    .group_by(_sessions.c.account_id, _sessions.c.lot_id)
)
_Q_PENDING = (
    sa.select(_pending.c.account_id, _pending.c.lot_id)
    .where(_in(_pending.c.account_id, "accounts"), _pending.c.session_id.is_(None))
    .distinct()
)
_Q_OCCUPANCY = (
    sa.select(_sessions.c.lot_id, sa.func.count().label("n"))
    .where(_in(_sessions.c.lot_id, "lots"), state_in(SessionState.OPEN))
    .group_by(_sessions.c.lot_id)
)
_Q_PERMITS = (
    sa.select(_permits.c.account_id).where(_in(_permits.c.account_id, "accounts")).distinct()
)
_Q_VALIDATIONS = (
    sa.select(_validations.c.session_id)
    .where(_in(_validations.c.session_id, "sessions"))
    .distinct()
)
_Q_KEYS = sa.select(_payments.c.idempotency_key).where(_in(_payments.c.idempotency_key, "keys"))
_Q_BALANCES = (
    sa.select(
        _postings.c.ledger_account,
        _postings.c.currency,
        sa.func.sum(_postings.c.amount_minor).label("total"),
    )
    .where(_in(_postings.c.ledger_account, "wallets"))
    .group_by(_postings.c.ledger_account, _postings.c.currency)
)
_Q_VERSIONS = sa.select(
    _versions.c.lot_id,
    _versions.c.version,
    _versions.c.effective_from,
    _versions.c.spec_json,
).where(_in(_versions.c.lot_id, "lots"))

_CLOSE = (
    _sessions.update()
    .where(
        _sessions.c.session_id == sa.bindparam("b_session_id"),
        state_in(SessionState.OPEN),
    )
    .values(
        state=SessionState.CLOSED,
        exit_gate_id=sa.bindparam("exit_gate_id"),
        exit_event_id=sa.bindparam("exit_event_id"),
        exited_at=sa.bindparam("exited_at"),
        offline_exit=False,
        amount_minor=sa.bindparam("amount_minor"),
        currency=sa.bindparam("currency"),
        settlement=sa.bindparam("settlement"),
        charge_transaction_id=sa.bindparam("charge_transaction_id"),
        quote_json=sa.bindparam("quote_json"),
        tariff_version=sa.bindparam("tariff_version"),
        payment_method=sa.bindparam("payment_method"),
    )
)


_Q_OPEN_LOCKED = _Q_OPEN.with_for_update()
_Q_ACCOUNTS_LOCKED = _Q_ACCOUNTS.with_for_update()
# Run on the DBAPI cursor, compiled once per dialect and IN-list sizes (see prepared.py):
# through Connection.execute each cost 120-230 µs, most of a batch of one event.
_PREPARED: dict[int, Prepared] = {
    id(statement): Prepared(statement)
    for statement in (
        _Q_PROCESSED,
        _Q_GATES,
        _Q_LOTS,
        _Q_NONCES,
        _Q_ACCOUNTS,
        _Q_ACCOUNTS_LOCKED,
        _Q_OPEN,
        _Q_OPEN_LOCKED,
        _Q_LAST_CLOSED,
        _Q_PENDING,
        _Q_OCCUPANCY,
        _Q_PERMITS,
        _Q_VALIDATIONS,
        _Q_KEYS,
        _Q_BALANCES,
        _Q_VERSIONS,
    )
}
_P_CLOSE = Prepared(_CLOSE)
_P_INSERT = {
    table.name: Prepared(table.insert())
    for table in (_sessions, _nonces, _transactions, _postings, _payments, _processed)
}


def _query(conn: Connection, statement: sa.Select[Any], **params: Any) -> list[Any]:
    return _PREPARED[id(statement)].all(conn, **params)


_MAX_CACHED_LOTS = 10_000

_NOT_CLOSED: dict[str, Any] = {
    "exit_gate_id": None,
    "exit_event_id": None,
    "exited_at": None,
    "amount_minor": None,
    "settlement": None,
    "charge_transaction_id": None,
    "quote_json": None,
    "tariff_version": None,
    "payment_method": None,
}


@dataclass(frozen=True, slots=True)
class _LotRef:
    """A lot as last read: its row and its gates' directions."""

    tick: float  # time.monotonic() when read
    now: datetime  # the service's clock when read
    lot: Any
    gates: dict[str, str]


@dataclass(slots=True)
class _Stay:
    session_id: str
    entered_at: datetime
    new: bool  # opened by this run: no validation, permit lookup or payment can refer to it
    prepaid: bool = False


@dataclass(slots=True)
class _Facts:
    """What the run read, then kept up to date as it decides."""

    claims: dict[str, CodeClaims | Reason]  # event id -> the verified code, or why not
    processed: dict[str, tuple[str, str, str]]  # event id -> (lot, gate, reply json)
    refs: dict[str, _LotRef]  # lot id -> the lot and its gates
    versions: dict[str, list[Any]]  # lot id -> its tariff versions (lots with an exit)
    spent: set[str]
    accounts: dict[str, Any]
    open: dict[tuple[str, str], _Stay]
    last_closed: dict[tuple[str, str], datetime]  # latest entry of a closed (not lost) stay
    pending: set[tuple[str, str]]
    occupancy: dict[str, int]
    permit_holders: set[str]
    validated: set[str]
    used_keys: set[str]
    balances: dict[tuple[str, str], int]


@dataclass(slots=True)
class _Writes:
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # by session id
    closes: list[dict[str, Any]] = field(default_factory=list)
    nonces: list[dict[str, Any]] = field(default_factory=list)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    postings: list[dict[str, Any]] = field(default_factory=list)
    payments: list[dict[str, Any]] = field(default_factory=list)
    processed: list[dict[str, Any]] = field(default_factory=list)

    def flush(self, conn: Connection) -> None:
        # Stays stored before this run are closed first (a driver who left and came back
        # in this run has one open stay at a time), then parents before children.
        _P_CLOSE.many(conn, self.closes)
        for table, rows in (
            (_sessions, list(self.sessions.values())),
            (_nonces, self.nonces),
            (_transactions, self.transactions),
            (_postings, self.postings),
            (_payments, self.payments),
            (_processed, self.processed),
        ):
            _P_INSERT[table.name].many(conn, rows)


class _Stop(Exception):
    """This event is the ORM flow's to decide."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What :meth:`FastPath.decide` did: the replies of ``decided`` events (in order), of
    which ``replayed`` were stored answers sent again."""

    replies: list[Reply]
    replayed: int


class FastPath:
    """Decides runs of online scan events with batched Core statements (see module doc)."""

    def __init__(self, config: FlowConfig, *, ref_ttl: float = 2.0) -> None:
        self.config = config
        self.ref_ttl = ref_ttl
        """How long lots and gates read are trusted (this process's own
        changes drop them at once: :meth:`forget`; another process's show within it)."""
        self._refs: dict[str, _LotRef] = {}
        self._tariffs: dict[Any, Tariff] = {}

    @staticmethod
    def handles(event: ScanEvent) -> bool:
        """Whether :meth:`decide` may take ``event`` at all (offline ones never)."""
        return event.offline is None

    def decide(self, conn: Connection, items: Sequence[Item], now: datetime) -> Outcome:
        """Decide the longest prefix of ``items`` this path handles; ``len(replies)`` says
        how many. Writes go through ``conn`` (the caller's transaction)."""
        with pipeline(conn):  # PostgreSQL: the reads in two round trips, the writes in one
            run = _Run(self.config, now, self._read(conn, items, now), self._tariffs)
            replies: list[Reply] = []
            replayed = 0
            for event, ref in items:
                try:
                    reply, again = run.one(event, ref)
                except _Stop:
                    break
                replies.append(reply)
                replayed += again
            run.writes.flush(conn)
        return Outcome(replies, replayed)

    # -- reading ----------------------------------------------------------------------------
    def forget(self) -> None:
        """Drop the cached lots and gates (this process changed one)."""
        self._refs.clear()

    def _references(
        self, conn: Connection, items: Sequence[Item], now: datetime
    ) -> dict[str, _LotRef]:
        """Each lot of the run with its gates, cached for ``ref_ttl``
        (of real and of service time); reloaded at once when a gate is not in it."""
        wanted: dict[str, set[str]] = {}
        for event, ref in items:
            wanted.setdefault(event.lot_id, set()).add(event.gate_id)
            wanted.setdefault(ref.lot_id, set())
        tick = time.monotonic()
        # Read once: forget() may clear the cache from another thread meanwhile.
        known = {lot: self._refs.get(lot) for lot in wanted}
        found = {
            lot: cached
            for lot, cached in known.items()
            if cached is not None
            and tick - cached.tick <= self.ref_ttl
            and timedelta(0) <= now - cached.now <= timedelta(seconds=self.ref_ttl)
            and wanted[lot] <= cached.gates.keys()
        }
        stale = sorted(wanted.keys() - found.keys())
        if stale:
            params = {"lots": stale}
            lots = {r.lot_id: r for r in _query(conn, _Q_LOTS, **params)}
            gates: dict[str, dict[str, str]] = {}
            for r in _query(conn, _Q_GATES, **params):
                gates.setdefault(r.lot_id, {})[r.gate_id] = r.direction
            if len(self._refs) > _MAX_CACHED_LOTS:
                self._refs.clear()
            for lot_id in stale:
                self._refs.pop(lot_id, None)
                if lot_id in lots:  # an unknown lot is asked again next time
                    found[lot_id] = self._refs[lot_id] = _LotRef(
                        tick, now, lots[lot_id], gates.get(lot_id, {})
                    )
        return found

    def _read(self, conn: Connection, items: Sequence[Item], now: datetime) -> _Facts:
        events = [event for event, _ in items]
        refs = self._references(conn, items, now)
        claims = {
            e.event_id: _verify(e, event_time(e, now, self.config), self.config) for e in events
        }  # never trust the gateway's own verification
        valid = [c for c in claims.values() if not isinstance(c, Reason)]
        accounts = sorted({c.account_id for c in valid})
        nonces = [c.nonce for c in valid]
        # What only an exit needs is read for the drivers scanning at an exit, and the lots'
        # occupancy only when someone enters.
        leaving = sorted(
            {
                c.account_id
                for e in events
                if e.direction is Direction.EXIT and not isinstance(c := claims[e.event_id], Reason)
            }
        )
        entering = sorted({e.lot_id for e in events if e.direction is Direction.ENTRY})
        exiting = sorted({e.lot_id for e in events if e.direction is Direction.EXIT})
        postgres = conn.dialect.name == "postgresql"

        def send(query: sa.Select[Any], **params: Iterable[str]) -> Pending | None:
            bound = {k: list(v) for k, v in params.items()}
            if any(not v for v in bound.values()):
                return None
            return _PREPARED[id(query)].submit(conn, **bound)

        def rows(sent: Pending | None) -> list[Any]:
            return [] if sent is None else sent.rows()

        # Sent together (one round trip in PostgreSQL's pipeline), in the order the ORM
        # flow locks in: stays, then accounts (see lock_account).
        sent_processed = send(_Q_PROCESSED, ids=[e.event_id for e in events])
        sent_open = send(_Q_OPEN_LOCKED if postgres else _Q_OPEN, accounts=accounts)
        sent_accounts = send(_Q_ACCOUNTS_LOCKED if postgres else _Q_ACCOUNTS, accounts=accounts)
        # Read every time, not cached: a version added by another process from now on
        # prices the stays entered from now on.
        sent_versions = send(_Q_VERSIONS, lots=exiting)
        sent_nonces = send(_Q_NONCES, nonces=nonces)
        sent_last_closed = send(_Q_LAST_CLOSED, accounts=leaving)
        sent_pending = send(_Q_PENDING, accounts=accounts)
        sent_occupancy = send(_Q_OCCUPANCY, lots=entering)
        sent_permits = send(_Q_PERMITS, accounts=leaving)
        sent_balances = send(_Q_BALANCES, wallets=[wallet_account(a) for a in leaving])
        open_stays = {
            (r.account_id, r.lot_id): _Stay(
                r.session_id,
                _aware(r.entered_at),
                False,
                bool(r.prepaid_minor) or r.prepaid_at is not None,
            )
            for r in rows(sent_open)
        }
        session_ids = [
            stay.session_id for (account, _), stay in open_stays.items() if account in leaving
        ]
        sent_validations = send(_Q_VALIDATIONS, sessions=session_ids)
        sent_keys = send(_Q_KEYS, keys=[f"exit:{sid}" for sid in session_ids])
        versions: dict[str, list[Any]] = {}
        for r in rows(sent_versions):
            versions.setdefault(r.lot_id, []).append(r)
        return _Facts(
            claims=claims,
            versions=versions,
            processed={
                r.event_id: (r.lot_id, r.gate_id, r.reply_json) for r in rows(sent_processed)
            },
            refs=refs,
            spent={r.nonce for r in rows(sent_nonces)},
            accounts={r.account_id: r for r in rows(sent_accounts)},
            open=open_stays,
            last_closed={
                (r.account_id, r.lot_id): _aware(r.entered_at)
                for r in rows(sent_last_closed)
                if r.entered_at is not None
            },
            pending={(r.account_id, r.lot_id) for r in rows(sent_pending)},
            occupancy={r.lot_id: int(r.n) for r in rows(sent_occupancy)},
            permit_holders={r.account_id for r in rows(sent_permits)},
            validated={r.session_id for r in rows(sent_validations)},
            used_keys={r.idempotency_key for r in rows(sent_keys)},
            balances={(r.ledger_account, r.currency): int(r.total) for r in rows(sent_balances)},
        )


class _Run:
    """One call of :meth:`FastPath.decide`: what it read, and what it decided so far."""

    def __init__(
        self, config: FlowConfig, now: datetime, facts: _Facts, tariffs: dict[Any, Tariff]
    ) -> None:
        self.config = config
        self.now = now
        self.facts = facts
        self.writes = _Writes()
        self._tariffs = tariffs

    def _tariff(self, version: Any, timezone: str) -> Tariff:
        """The engine tariff of a version row (versions never change: parsed once)."""
        key = (version.lot_id, version.version, version.spec_json, timezone)
        tariff = self._tariffs.get(key)
        if tariff is None:
            tariff = self._tariffs[key] = tariff_of(
                TariffVersion(
                    lot_id=version.lot_id,
                    version=version.version,
                    effective_from=_aware(version.effective_from),
                    spec_json=version.spec_json,
                    created_at=_aware(version.effective_from),
                ),
                timezone,
            )
        return tariff

    # -- deciding one event -----------------------------------------------------------------
    def one(self, event: ScanEvent, ref: TopicRef) -> tuple[Reply, bool]:
        facts, writes, now = self.facts, self.writes, self.now
        if not FastPath.handles(event):
            raise _Stop
        done = facts.processed.get(event.event_id)
        if done is not None:
            return self._replay(done), True
        decision = self._decision(event, ref)
        reply = _command_for(event.event_id, ref, decision, now, self.config)
        assert isinstance(reply.message, GateCommand)
        assert ref.gate_id is not None
        payload = reply.payload.decode()
        writes.processed.append(
            {
                "event_id": event.event_id,
                "lot_id": ref.lot_id,
                "gate_id": ref.gate_id,
                "seq": event.seq,
                "boot": event.boot,
                "reply_json": payload,
                "processed_at": now,
                "command_id": reply.message.command_id,
            }
        )
        facts.processed[event.event_id] = (ref.lot_id, ref.gate_id, payload)
        return reply, False

    def _replay(self, done: tuple[str, str, str]) -> Reply:
        lot_id, gate_id, reply_json = done
        stored = decode(reply_json)
        assert isinstance(stored, GateCommand | EventAck)
        return Reply(
            topic=gate_topic(lot_id, gate_id, TopicKind.COMMANDS),
            payload=reply_json.encode(),
            message=stored,
            expiry=None
            if isinstance(stored, EventAck)
            else int(self.config.command_ttl.total_seconds()),
            replayed=True,
        )

    def _decision(self, event: ScanEvent, ref: TopicRef) -> _Decision:
        facts, writes = self.facts, self.writes
        if (event.lot_id, event.gate_id) != (ref.lot_id, ref.gate_id):
            return _Decision(GateAction.DENY, Reason.GATE_MISMATCH)
        ref_ = facts.refs.get(event.lot_id)
        direction = None if ref_ is None else ref_.gates.get(event.gate_id)
        if ref_ is None or direction is None:
            return _Decision(GateAction.DENY, Reason.GATE_UNKNOWN)
        lot = ref_.lot
        if event.direction != Direction(direction):
            return _Decision(GateAction.DENY, Reason.GATE_MISMATCH)
        at = event_time(event, self.now, self.config)
        claims = facts.claims[event.event_id]
        if isinstance(claims, Reason):
            return _Decision(GateAction.DENY, claims)
        if claims.nonce in facts.spent:
            return _Decision(GateAction.DENY, Reason.CODE_REPLAYED)
        account = facts.accounts.get(claims.account_id)
        if account is None:
            return _Decision(GateAction.DENY, Reason.ACCOUNT_UNKNOWN)
        if account.blocked:
            return _Decision(GateAction.DENY, Reason.ACCOUNT_BLOCKED)
        where = (account.account_id, lot.lot_id)
        if where in facts.pending:
            raise _Stop  # offline scans wait to be paired: the ORM flow does that
        current = facts.open.get(where)
        if event.direction is Direction.ENTRY:
            if current is not None:
                return _Decision(GateAction.DENY, Reason.ALREADY_INSIDE)
            if facts.occupancy.get(lot.lot_id, 0) >= lot.capacity:
                return _Decision(GateAction.DENY, Reason.LOT_FULL)
            decision = self._enter(event, lot, account.account_id, at)
        else:
            decision = self._exit(event, lot, account, current, at)
        if decision.action is GateAction.OPEN:
            facts.spent.add(claims.nonce)
            writes.nonces.append(
                {
                    "nonce": claims.nonce,
                    "account_id": claims.account_id,
                    "event_id": event.event_id,
                    "used_at": at,
                }
            )
        return decision

    def _enter(self, event: ScanEvent, lot: Any, account_id: str, at: datetime) -> _Decision:
        facts, writes = self.facts, self.writes
        session_id = new_id()
        writes.sessions[session_id] = {
            "session_id": session_id,
            "account_id": account_id,
            "lot_id": lot.lot_id,
            "state": SessionState.OPEN,
            "entry_gate_id": event.gate_id,
            "entry_event_id": event.event_id,
            "entered_at": at,
            "offline_entry": False,
            "offline_exit": False,
            "currency": lot.currency,
            "lost_ticket": False,
            "prepaid_minor": 0,
            **_NOT_CLOSED,
        }
        facts.open[(account_id, lot.lot_id)] = _Stay(session_id, at, True)
        facts.occupancy[lot.lot_id] = facts.occupancy.get(lot.lot_id, 0) + 1
        return _Decision(GateAction.OPEN, Reason.WELCOME, session_id=session_id)

    def _exit(
        self, event: ScanEvent, lot: Any, account: Any, stay: _Stay | None, at: datetime
    ) -> _Decision:
        facts, writes = self.facts, self.writes
        where = (account.account_id, lot.lot_id)
        last_closed = facts.last_closed.get(where)
        if (
            stay is None  # a lost ticket, or an entry not known yet
            or stay.entered_at > at
            # A closed stay entered after the open one (offline events reconciled late):
            # which stay this exit ends is for the ORM flow's pairing to say.
            or (last_closed is not None and last_closed > stay.entered_at)
            or stay.prepaid
            or account.payment_method != "wallet"
            or account.account_id in facts.permit_holders
            or stay.session_id in facts.validated
            or (not stay.new and f"exit:{stay.session_id}" in facts.used_keys)
        ):
            raise _Stop
        version = _version_at(facts.versions.get(lot.lot_id, []), stay.entered_at)
        price = price_stay(self._tariff(version, lot.timezone), stay.entered_at, at)
        due = Money(amount_minor=price.due_minor, currency=price.quote.amount.currency)
        transaction_id = None
        method = None
        settlement = "free"
        if due.amount_minor > 0:
            wallet = wallet_account(account.account_id)
            balance = facts.balances.get((wallet, due.currency), 0)
            if balance < due.amount_minor:
                if lot.payment_policy == "pay_later":
                    raise _Stop  # let out owing: the ORM flow books the debt
                return _Decision(GateAction.DENY, Reason.INSUFFICIENT_BALANCE, amount=due)
            facts.balances[(wallet, due.currency)] = balance - due.amount_minor
            transaction_id = self._pay(account.account_id, lot.lot_id, stay, due, at)
            method, settlement = "wallet", "paid"
        closing = {
            "exit_gate_id": event.gate_id,
            "exit_event_id": event.event_id,
            "exited_at": at,
            "amount_minor": price.quote.amount.amount_minor,
            "currency": price.quote.amount.currency,
            "settlement": settlement,
            "charge_transaction_id": transaction_id,
            "quote_json": price.quote.line_items_json(),
            "tariff_version": version.version,
            "payment_method": method,
        }
        if stay.new:  # opened by this run: stored closed at once (one open stay per driver)
            writes.sessions[stay.session_id].update(closing, state=SessionState.CLOSED)
        else:
            writes.closes.append({"b_session_id": stay.session_id, **closing})
        del facts.open[where]
        facts.last_closed[where] = max(last_closed or stay.entered_at, stay.entered_at)
        facts.occupancy[lot.lot_id] = facts.occupancy.get(lot.lot_id, 1) - 1
        return _Decision(GateAction.OPEN, Reason.PAID, amount=due, session_id=stay.session_id)

    def _pay(self, account_id: str, lot_id: str, stay: _Stay, due: Money, at: datetime) -> str:
        """The wallet pays: one balanced ledger transaction and the payment booking it, as
        :func:`server.payments.service.settle` books a wallet capture."""
        writes = self.writes
        transaction_id = new_id()
        key = f"exit:{stay.session_id}"
        writes.transactions.append(
            {
                "transaction_id": transaction_id,
                "kind": "charge",
                "account_id": account_id,
                "reference": f"session:{stay.session_id}",
                "created_at": at,
            }
        )
        for spec in payment_postings(wallet_account(account_id), lot_id, due.amount_minor):
            writes.postings.append(
                {
                    "transaction_id": transaction_id,
                    "ledger_account": spec.ledger_account,
                    "amount_minor": spec.amount_minor,
                    "currency": due.currency,
                }
            )
        writes.payments.append(
            {
                "payment_id": new_id(),
                "idempotency_key": key,
                "session_id": stay.session_id,
                "account_id": account_id,
                "lot_id": lot_id,
                "method": "wallet",
                "status": "captured",
                "amount_minor": due.amount_minor,
                "currency": due.currency,
                "provider_ref": f"wallet:{key}",
                "collects_payment_id": None,
                "transaction_id": transaction_id,
                "created_at": at,
            }
        )
        return transaction_id


def _aware(value: datetime) -> datetime:
    return value if value.utcoffset() is not None else value.replace(tzinfo=UTC)


def _version_at(versions: list[Any], at: datetime) -> Any:
    """:func:`server.pricing.service.version_at` over rows already read."""
    if not versions:
        raise _Stop  # no tariff: the ORM flow raises the same NotFoundError a dead letter keeps
    effective = [v for v in versions if _aware(v.effective_from) <= at]
    if effective:
        return max(effective, key=lambda v: (_aware(v.effective_from), v.version))
    return min(versions, key=lambda v: v.version)
