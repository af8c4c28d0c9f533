"""Read models for the panel pages and the few writes the panel owns (read-mostly SQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, or_, select

from parking_protocol.messages import DenyList, GateCommand, GatewayStatus, encode, new_id
from parking_protocol.topics import TopicKind, denylist_topic, gate_topic
from parking_protocol.types import DENY_TEXT, GateAction, Reason
from server.accounts.models import Account, LedgerTransaction, Posting
from server.gateways.models import CommandReplyRecord, Gate, GatewayStatusRecord
from server.lots import service as lots
from server.lots.models import Lot, LotRead
from server.panel.models import GateStatusChange
from server.sessions.models import ParkingSession

__all__ = [
    "GateView",
    "LotView",
    "accounts_matching",
    "blocked_accounts",
    "dashboard",
    "denylist",
    "gate_history",
    "gate_view",
    "manual_open_command",
    "panel_zone",
    "record_status_change",
    "replies_to",
    "search_sessions",
    "transaction_postings",
]

ONLINE_WITHIN = timedelta(seconds=90)  # a gateway silent for longer is shown as stale


@dataclass(frozen=True, slots=True)
class GateView:
    lot_id: str
    gate_id: str
    name: str
    direction: str
    state: str  # online | offline | stale | unknown
    firmware_version: str
    boot: int | None
    last_seen: datetime | None
    seconds_since: int | None
    queue_depth: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class LotView:
    lot: LotRead
    gates: list[GateView] = field(default_factory=list)

    @property
    def percent(self) -> int:
        occupancy = self.lot.occupancy
        return min(100, round(100 * occupancy.open_sessions / max(1, occupancy.capacity)))


def gate_view(gate: Gate, record: GatewayStatusRecord | None, now: datetime) -> GateView:
    if record is None:
        return GateView(
            gate.lot_id,
            gate.gate_id,
            gate.name,
            gate.direction,
            "unknown",
            "",
            None,
            None,
            None,
            0,
            None,
        )
    since = max(0, int((now - record.last_seen).total_seconds()))
    state = record.state
    if state == "online" and now - record.last_seen > ONLINE_WITHIN:
        state = "stale"
    return GateView(
        gate.lot_id,
        gate.gate_id,
        gate.name,
        gate.direction,
        state,
        record.firmware_version,
        record.boot,
        record.last_seen,
        since,
        record.queue_depth,
        record.last_error,
    )


def dashboard(db: Session, now: datetime) -> list[LotView]:
    statuses = {(r.lot_id, r.gate_id): r for r in db.exec(select(GatewayStatusRecord))}
    gates: dict[str, list[GateView]] = {}
    for gate in db.exec(select(Gate).order_by(col(Gate.lot_id), col(Gate.gate_id))):
        view = gate_view(gate, statuses.get((gate.lot_id, gate.gate_id)), now)
        gates.setdefault(gate.lot_id, []).append(view)
    return [
        LotView(lots.lot_read(db, lot), gates.get(lot.lot_id, [])) for lot in lots.list_lots(db)
    ]


def record_status_change(db: Session, status: GatewayStatus, *, now: datetime) -> bool:
    """Keep a status when it changes something a person cares about; heartbeats are skipped."""
    last = db.exec(
        select(GateStatusChange)
        .where(GateStatusChange.lot_id == status.lot_id, GateStatusChange.gate_id == status.gate_id)
        .order_by(col(GateStatusChange.id).desc())
        .limit(1)
    ).first()
    if last is not None:
        if status.state.value == "offline" and status.boot < last.boot:
            return False  # a late last will of an earlier boot
        if (last.state, last.boot, last.firmware_version, last.last_error) == (
            status.state.value,
            status.boot,
            status.firmware_version,
            status.last_error,
        ):
            return False
    db.add(
        GateStatusChange(
            lot_id=status.lot_id,
            gate_id=status.gate_id,
            state=status.state.value,
            boot=status.boot,
            firmware_version=status.firmware_version,
            last_error=status.last_error,
            at=now,
        )
    )
    db.flush()
    return True


def gate_history(db: Session, lot_id: str, gate_id: str, limit: int = 50) -> list[GateStatusChange]:
    return list(
        db.exec(
            select(GateStatusChange)
            .where(GateStatusChange.lot_id == lot_id, GateStatusChange.gate_id == gate_id)
            .order_by(col(GateStatusChange.id).desc())
            .limit(limit)
        )
    )


def replies_to(db: Session, command_ids: list[str]) -> dict[str, list[CommandReplyRecord]]:
    if not command_ids:
        return {}
    found: dict[str, list[CommandReplyRecord]] = {}
    query = select(CommandReplyRecord).where(col(CommandReplyRecord.command_id).in_(command_ids))
    for reply in db.exec(query.order_by(col(CommandReplyRecord.at))):
        found.setdefault(reply.command_id, []).append(reply)
    return found


def manual_open_command(
    lot_id: str, gate_id: str, *, now: datetime, ttl: timedelta
) -> tuple[str, bytes, GateCommand]:
    """An operator's open: no event, reason MANUAL_OPEN, a short deadline."""
    command = GateCommand(
        command_id=new_id(),
        event_id=None,
        lot_id=lot_id,
        gate_id=gate_id,
        action=GateAction.OPEN,
        reason=Reason.MANUAL_OPEN,
        display=DENY_TEXT[Reason.MANUAL_OPEN],
        issued_at=now,
        deadline=now + ttl,
    )
    return gate_topic(lot_id, gate_id, TopicKind.COMMANDS), encode(command), command


def panel_zone(all_lots: Sequence[Lot]) -> str:
    """The zone the panel counts days and reads form times in: the lots' zone when they
    share one, else UTC."""
    zones = {lot.timezone for lot in all_lots}
    return zones.pop() if len(zones) == 1 else "UTC"


def blocked_accounts(db: Session) -> tuple[str, ...]:
    query = select(Account.account_id).where(col(Account.blocked).is_(True))
    return tuple(sorted(db.exec(query)))


def denylist(db: Session, *, now: datetime) -> list[tuple[str, bytes]]:
    """The retained deny list for every lot: (topic, payload) pairs."""
    accounts = blocked_accounts(db)
    return [
        (
            denylist_topic(lot.lot_id),
            encode(DenyList(list_id=new_id(), lot_id=lot.lot_id, accounts=accounts, issued_at=now)),
        )
        for lot in lots.list_lots(db)
    ]


def accounts_matching(db: Session, text: str, limit: int = 50) -> list[Account]:
    query = select(Account).order_by(col(Account.account_id)).limit(limit)
    if text:
        pattern = f"%{text.lower()}%"
        query = query.where(
            or_(
                sa.func.lower(col(Account.account_id)).like(pattern),
                sa.func.lower(col(Account.name)).like(pattern),
            )
        )
    return list(db.exec(query))


def search_sessions(
    db: Session,
    *,
    lot_id: str | None = None,
    account_id: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[ParkingSession]:
    query = select(ParkingSession)
    if lot_id:
        query = query.where(ParkingSession.lot_id == lot_id)
    if account_id:
        query = query.where(ParkingSession.account_id == account_id)
    if state:
        query = query.where(ParkingSession.state == state)
    if since is not None:
        query = query.where(col(ParkingSession.entered_at) >= since)
    if until is not None:
        query = query.where(col(ParkingSession.entered_at) < until)
    query = query.order_by(col(ParkingSession.entered_at).desc()).limit(limit)
    return list(db.exec(query))


def transaction_postings(
    db: Session, transaction_id: str | None
) -> tuple[LedgerTransaction | None, list[Posting]]:
    if transaction_id is None:
        return None, []
    transaction = db.get(LedgerTransaction, transaction_id)
    postings = db.exec(
        select(Posting)
        .where(Posting.transaction_id == transaction_id)
        .order_by(col(Posting.posting_id))
    )
    return transaction, list(postings)
